"""From documents to batches: the split, packing and the per-host iterator.

Every host tokenizes and packs the whole corpus in its memory as numpy arrays
(4 bytes per token), so host memory bounds the corpus size.
"""

import dataclasses
import os
from typing import Optional, Sequence

from absl import logging
import numpy as np

from mcd_jax.data import corpus
from mcd_jax.data import tokenizers

DataError = corpus.DataError


def _split_text(text: str, validation_fraction: float) -> tuple[str, str]:
  """Cuts `text` so its last `validation_fraction` of characters is held out."""
  cut = int(len(text) * (1.0 - validation_fraction))
  cut = min(max(cut, 1), len(text) - 1)
  return text[:cut], text[cut:]


def split_documents(documents: Sequence[str], validation_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits documents into (train, validation), the same way for the same seed.

  With at least 2 / validation_fraction documents, round(validation_fraction * n)
  whole documents are drawn at random for validation, both sides keeping the
  input order. With fewer, a document-level split would hold out a share far
  from the requested fraction (one of 21 books is 5% only if the books are of
  equal length), so every document is cut instead: its last
  `validation_fraction` of characters goes to validation.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise DataError(f'validation_fraction must be in (0, 1), got {validation_fraction}.')
  if not documents:
    raise DataError('Cannot split an empty list of documents.')

  if len(documents) < 2.0 / validation_fraction:
    train, validation = [], []
    for text in documents:
      if len(text) < 2:
        continue
      train_text, validation_text = _split_text(text, validation_fraction)
      train.append(train_text)
      validation.append(validation_text)
    if not train:
      raise DataError('The documents need at least 2 characters to be split.')
    return train, validation

  num_validation = int(round(validation_fraction * len(documents)))
  num_validation = min(max(num_validation, 1), len(documents) - 1)
  order = np.random.default_rng(seed).permutation(len(documents))
  validation_indices = set(order[:num_validation].tolist())
  train = [d for i, d in enumerate(documents) if i not in validation_indices]
  validation = [d for i, d in enumerate(documents) if i in validation_indices]
  return train, validation


def pack(token_arrays: Sequence[np.ndarray], seq_len: int,
         separator_id: Optional[int] = None) -> np.ndarray:
  """Concatenates tokenized documents and cuts them into rows of `seq_len` tokens.

  `separator_id`, when given, goes between consecutive documents. The ragged
  tail shorter than `seq_len` is dropped, so the result may have no rows.

  Returns:
    int32[num_rows, seq_len].
  """
  if seq_len <= 0:
    raise DataError(f'seq_len must be positive, got {seq_len}.')

  pieces = []
  for index, tokens in enumerate(token_arrays):
    if index > 0 and separator_id is not None:
      pieces.append(np.array([separator_id], dtype=np.int32))
    pieces.append(np.asarray(tokens, dtype=np.int32))
  stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)

  num_rows = len(stream) // seq_len
  return stream[:num_rows * seq_len].reshape(num_rows, seq_len)


class PackedIterator:
  """An endless, checkpointable iterator over packed training rows.

  Every epoch visits the rows in a new order drawn from (seed, epoch), in
  global batches of `global_batch_size` rows. The rows left over after the
  last full batch of an epoch are skipped in that epoch. Each host yields only its
  own slice of every global batch: rows [i * b, (i + 1) * b) for process_index
  i and b = global_batch_size / process_count, so the hosts together cover the
  global batch without overlap.
  """

  def __init__(self, rows: np.ndarray, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise DataError(
          f'The global batch size {global_batch_size} must be positive and '
          f'divisible by the number of processes {process_count}.')
    if not 0 <= process_index < process_count:
      raise DataError(f'process_index {process_index} is not in [0, {process_count}).')
    if len(rows) < global_batch_size:
      raise DataError(
          f'The training set has {len(rows)} rows of {rows.shape[-1]} tokens, '
          f'but one global batch needs {global_batch_size}. Use more data, a '
          'smaller batch_size or a shorter seq_len.')

    self.rows = rows  # int32[num_rows, seq_len]
    self.global_batch_size = global_batch_size
    self.per_process_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.batches_per_epoch = len(rows) // global_batch_size
    self.seed = seed
    self.epoch = 0
    self.position = 0  # Index of the next global batch within the epoch.
    self._order_epoch = None
    self._order = None

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      self._order = rng.permutation(len(self.rows))
      self._order_epoch = self.epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    """Returns int32[per_process_batch_size, seq_len], this host's slice of the next global batch."""
    if self.position >= self.batches_per_epoch:
      self.epoch += 1
      self.position = 0

    start = self.position * self.global_batch_size
    start += self.process_index * self.per_process_batch_size
    indices = self._epoch_order()[start:start + self.per_process_batch_size]
    self.position += 1
    return self.rows[indices]

  def get_state(self) -> dict:
    """Returns a JSON-serializable state; `set_state` of it resumes exactly here."""
    return {
        'epoch': int(self.epoch),
        'position': int(self.position),
        'seed': int(self.seed),
        'num_rows': int(len(self.rows)),
        'global_batch_size': int(self.global_batch_size),
    }

  def set_state(self, state: dict) -> None:
    """Restores `get_state()` output; raises DataError if it was taken on other data."""
    for key, current in (('num_rows', len(self.rows)),
                         ('global_batch_size', self.global_batch_size)):
      if key in state and int(state[key]) != current:
        raise DataError(
            f'The saved data iterator state has {key}={state[key]}, but this '
            f'run has {key}={current}: the corpus, tokenizer, seq_len or batch '
            'size changed since the checkpoint.')
    self.seed = int(state['seed'])
    self.epoch = int(state['epoch'])
    self.position = int(state['position'])


def validation_batches(rows: np.ndarray, batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
  """Cuts validation rows into global batches, in order, padding the last one.

  The last batch is padded with rows of token 0 so that every row is evaluated
  once and every batch has the same shape. Like `PackedIterator`, each host
  gets rows [i * b, (i + 1) * b) of every global batch, b = batch_size /
  process_count.

  Returns:
    A list of (tokens int32[b, seq_len], row_mask bool[b]) pairs, where
    row_mask is False on padding rows.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(
        f'The validation batch size {batch_size} must be positive and divisible '
        f'by the number of processes {process_count}.')
  per_process = batch_size // process_count

  batches = []
  for start in range(0, len(rows), batch_size):
    tokens = rows[start:start + batch_size]
    row_mask = np.ones([batch_size], dtype=bool)
    if len(tokens) < batch_size:
      row_mask[len(tokens):] = False
      padding = np.zeros([batch_size - len(tokens), rows.shape[1]], dtype=np.int32)
      tokens = np.concatenate([tokens, padding])

    host = slice(process_index * per_process, (process_index + 1) * per_process)
    batches.append((tokens[host], row_mask[host]))
  return batches


@dataclasses.dataclass
class Datasets:
  """What `make_datasets` returns to the trainer."""

  tokenizer: tokenizers.Tokenizer
  train_iterator: PackedIterator
  validation_rows: np.ndarray  # int32[num_validation_rows, seq_len], all hosts.
  num_documents: int
  num_characters: int
  num_train_tokens: int
  num_validation_tokens: int
  markov: Optional[corpus.MarkovSource] = None  # The chain, for source 'markov'.


def make_datasets(data_config, tokenizer_dir: str, process_index: int = 0,
                  process_count: int = 1) -> Datasets:
  """Loads, tokenizes, splits and packs the corpus of `data_config`.

  The tokenizer is loaded from `tokenizer_dir` when that folder already has
  one (a resumed run or a student reusing its teacher's), else built from
  all documents, train and validation, and saved there. The character
  vocabulary therefore covers validation text too.
  """
  documents = corpus.load_documents(data_config)
  num_documents = len(documents)
  num_characters = sum(len(d) for d in documents)

  if tokenizers.has_tokenizer(tokenizer_dir):
    tokenizer = tokenizers.load_tokenizer(tokenizer_dir)
    if tokenizer.kind != data_config.tokenizer:
      raise DataError(
          f'{tokenizer_dir} has a {tokenizer.kind!r} tokenizer, but the config asks '
          f"for {data_config.tokenizer!r}. Use another workdir or set "
          f'data.tokenizer={tokenizer.kind!r}.')
    logging.info('Loaded %s tokenizer from %s: vocab_size=%d, fingerprint=%s.',
                 tokenizer.kind, tokenizer_dir, tokenizer.vocab_size, tokenizer.fingerprint())
  else:
    # NOTE: every process builds its own tokenizer and only process 0 saves it.
    # 'char' and 'gpt2' are deterministic; SentencePiece training is assumed
    # to be, which holds for one process and was not checked across hosts.
    tokenizer = tokenizers.build_tokenizer(data_config, documents)
    if process_index == 0:
      tokenizer.save(tokenizer_dir)
      logging.info('Saved tokenizer to %s.', os.path.join(tokenizer_dir, tokenizers.TOKENIZER_FILE))

  train_documents, validation_documents = split_documents(
      documents, float(data_config.validation_fraction), int(data_config.seed))
  del documents
  train_tokens = [tokenizer.encode(d) for d in train_documents]
  validation_tokens = [tokenizer.encode(d) for d in validation_documents]

  seq_len = int(data_config.seq_len)
  train_rows = pack(train_tokens, seq_len, tokenizer.separator_id)
  validation_rows = pack(validation_tokens, seq_len, tokenizer.separator_id)
  if len(validation_rows) == 0:
    raise DataError(
        f'The validation split has {sum(len(t) for t in validation_tokens)} tokens, '
        f'fewer than one row of seq_len={seq_len}. Raise validation_fraction or use more data.')

  train_iterator = PackedIterator(
      train_rows, int(data_config.batch_size), int(data_config.seed),
      process_index=process_index, process_count=process_count)

  datasets = Datasets(
      tokenizer=tokenizer,
      train_iterator=train_iterator,
      validation_rows=validation_rows,
      num_documents=num_documents,
      num_characters=num_characters,
      num_train_tokens=sum(len(t) for t in train_tokens),
      num_validation_tokens=sum(len(t) for t in validation_tokens),
  )
  if data_config.source == 'markov':
    datasets.markov = corpus.markov_source(
        int(data_config.get('markov_num_symbols', corpus.MARKOV_DEFAULT_NUM_SYMBOLS)),
        int(data_config.seed))

  logging.info(
      'Data: %d documents (%d train, %d validation), %d characters; %d train '
      'tokens in %d rows, %d validation tokens in %d rows of %d tokens; %d '
      'batches per epoch.', datasets.num_documents, len(train_documents),
      len(validation_documents), num_characters, datasets.num_train_tokens,
      len(train_rows), datasets.num_validation_tokens, len(validation_rows), seq_len,
      train_iterator.batches_per_epoch)
  return datasets
