"""Tokenizers: character, SentencePiece and GPT-2 byte-level BPE.

Every tokenizer maps text to int32 ids in [0, vocab_size). The diffusion models
reserve one more id, the mask id K = `vocab_size`, which `decode` shows as
MASK_PLACEHOLDER so that partly masked samples can be printed. Any other id
outside [0, K] makes `decode` raise DataError.

`save(directory)` writes `tokenizer.json` ({"type": ..., "data": ...}) and any
model files it names, and `load_tokenizer(directory)` reads them back.
`fingerprint()` is a short hash of the vocabulary, which a checkpoint can store
to check that it is restored with the tokenizer it was trained with.
"""

import hashlib
import io
import json
import os
import re
from typing import Optional, Protocol, Sequence

from absl import logging
import numpy as np

try:
  import regex
except ImportError:  # GPT2_PATTERN_FALLBACK is used instead.
  regex = None

from mcd_jax.data import corpus

DataError = corpus.DataError

# Shown by `decode` for the mask id K = vocab_size.
MASK_PLACEHOLDER = '▒'
TOKENIZER_FILE = 'tokenizer.json'
SENTENCEPIECE_MODEL_FILE = 'sentencepiece.model'


class Tokenizer(Protocol):
  """Interface of a tokenizer, as the pipeline and the trainer use it."""

  kind: str  # 'char', 'sentencepiece' or 'gpt2'.
  vocab_size: int  # K; the mask id is K.
  separator_id: Optional[int]  # Token between packed documents, or None.

  def encode(self, text: str) -> np.ndarray:  # int32[num_tokens]
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...

  def save(self, directory: str) -> None:
    ...

  def fingerprint(self) -> str:
    ...


def _short_hash(*parts: bytes) -> str:
  digest = hashlib.sha256()
  for part in parts:
    digest.update(hashlib.sha256(part).digest())
  return digest.hexdigest()[:16]


def _write_tokenizer_json(directory: str, kind: str, data: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, TOKENIZER_FILE)
  # Written beside and renamed, so a crash never leaves a truncated file.
  temporary = path + '.tmp'
  with open(temporary, 'w', encoding='utf-8') as f:
    json.dump({'type': kind, 'data': data}, f, ensure_ascii=False, indent=1)
  os.replace(temporary, path)


def _decode_runs(ids, vocab_size: int, decode_run) -> str:
  """Decodes the runs of ordinary ids with `decode_run` and shows each mask id K as MASK_PLACEHOLDER."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  invalid = ids[(ids < 0) | (ids > vocab_size)]
  if invalid.size:
    raise DataError(
        f'Cannot decode ids {sorted(set(invalid.tolist()))[:10]}: valid ids are '
        f'0..{vocab_size - 1}, and {vocab_size} is the mask id.')

  pieces = []
  run_start = 0
  for mask_position in np.flatnonzero(ids == vocab_size).tolist() + [len(ids)]:
    if mask_position > run_start:
      pieces.append(decode_run(ids[run_start:mask_position].tolist()))
    if mask_position < len(ids):
      pieces.append(MASK_PLACEHOLDER)
    run_start = mask_position + 1
  return ''.join(pieces)


# ---------------------------------------------------------------------------
# Characters.


class CharTokenizer:
  """One id per character: id i is the i-th character of the sorted vocabulary."""

  kind = 'char'

  def __init__(self, characters: str):
    if not characters:
      raise DataError('A character vocabulary needs at least one character.')
    if len(set(characters)) != len(characters) or list(characters) != sorted(characters):
      raise DataError('Character vocabulary must be sorted and without repeats.')
    self.characters = characters
    self._code_points = np.array([ord(c) for c in characters], dtype=np.int64)

  @classmethod
  def from_documents(cls, documents: Sequence[str]) -> 'CharTokenizer':
    characters = set()
    for document in documents:
      characters.update(document)
    return cls(''.join(sorted(characters)))

  @property
  def vocab_size(self) -> int:
    return len(self.characters)

  @property
  def separator_id(self) -> Optional[int]:
    index = self.characters.find('\n')
    return index if index >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    """Returns int32[len(text)]; raises DataError naming characters outside the vocabulary."""
    code_points = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32).astype(np.int64)
    ids = np.searchsorted(self._code_points, code_points)
    ids = np.minimum(ids, self.vocab_size - 1)

    unknown = code_points[self._code_points[ids] != code_points]
    if unknown.size:
      names = ', '.join(repr(chr(c)) for c in sorted(set(unknown.tolist()))[:20])
      raise DataError(
          f'{unknown.size} characters are not in the {self.vocab_size}-character '
          f'vocabulary: {names}. Build the tokenizer from a corpus that contains them.')
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return _decode_runs(ids, self.vocab_size, lambda run: ''.join(self.characters[i] for i in run))

  def save(self, directory: str) -> None:
    _write_tokenizer_json(directory, self.kind, {'characters': self.characters})

  def fingerprint(self) -> str:
    return _short_hash(self.kind.encode(), self.characters.encode('utf-8'))


# ---------------------------------------------------------------------------
# SentencePiece.


class SentencePieceTokenizer:
  """A SentencePiece unigram model.

  With byte fallback, decode(encode(text)) returns `text` unchanged, because
  training uses the identity normalization, keeps whitespace and adds a '\\n'
  piece, which also separates packed documents.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def train(cls, documents: Sequence[str], vocab_size: int,
            max_sentences: int = 2_000_000) -> 'SentencePieceTokenizer':
    """Trains a unigram model on the lines of `documents` (at most `max_sentences` of them).

    Byte fallback needs 256 byte pieces plus one piece per character of the
    corpus. When `vocab_size` is too small for that, the model is trained
    without it and `encode` maps characters outside the model to <unk> (id 0).
    """
    if vocab_size <= 0:
      raise DataError(
          "tokenizer 'sentencepiece' needs data_config.vocab_size > 0, e.g. 4096.")
    try:
      model = cls._train_model(documents, vocab_size, max_sentences, byte_fallback=True)
    except RuntimeError as error:
      if 'smaller than required_chars' not in str(error):
        raise DataError(f'SentencePiece training failed (vocab_size={vocab_size}): {error}') from None
      logging.warning(
          'vocab_size=%d is too small for byte fallback (%s). Training without '
          'it, so characters outside the model encode as <unk>.', vocab_size, error)
      try:
        model = cls._train_model(documents, vocab_size, max_sentences, byte_fallback=False)
      except RuntimeError as error2:
        raise DataError(
            f'SentencePiece training failed (vocab_size={vocab_size}): {error2}') from None

    tokenizer = cls(model)
    if tokenizer.vocab_size < vocab_size:
      logging.warning(
          'SentencePiece found only %d pieces for vocab_size=%d in this corpus; '
          'the model uses K=%d.', tokenizer.vocab_size, vocab_size, tokenizer.vocab_size)
    return tokenizer

  @staticmethod
  def _train_model(documents, vocab_size, max_sentences, byte_fallback) -> bytes:
    import sentencepiece  # pylint: disable=g-import-not-at-top

    def sentences():
      for document in documents:
        for line in document.split('\n'):
          if line.strip():
            yield line

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model,
        vocab_size=vocab_size, model_type='unigram', character_coverage=0.9995,
        byte_fallback=byte_fallback, normalization_rule_name='identity',
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=['\n'],
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    return model.getvalue()

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def separator_id(self) -> Optional[int]:
    piece_id = self._processor.piece_to_id('\n')
    return None if piece_id == self._processor.unk_id() else piece_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return _decode_runs(ids, self.vocab_size, self._processor.decode)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SENTENCEPIECE_MODEL_FILE), 'wb') as f:
      f.write(self.model_proto)
    _write_tokenizer_json(directory, self.kind, {
        'model_file': SENTENCEPIECE_MODEL_FILE,
        'model_sha256': hashlib.sha256(self.model_proto).hexdigest(),
    })

  def fingerprint(self) -> str:
    return _short_hash(self.kind.encode(), self.model_proto)


# ---------------------------------------------------------------------------
# GPT-2 byte-level BPE.


# The GPT-2 pre-tokenization pattern: contractions, letter runs, number runs and
# symbol runs, each with at most one leading space, then whitespace.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")
# NOTE: without the `regex` package, `re` cannot match \p{L} and \p{N}. This
# fallback treats every non-digit word character (numeric signs such as '½'
# included) as a letter, and only Unicode decimal digits as numbers.
GPT2_PATTERN_FALLBACK = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+"""
                         r"""|\s+(?!\S)|\s+""")
END_OF_TEXT = '<|endoftext|>'
GPT2_VOCAB_FILE = 'vocab.json'
GPT2_MERGES_FILE = 'merges.txt'


def bytes_to_unicode() -> dict[int, str]:
  """Returns GPT-2's map from each byte to a printable character.

  Printable Latin-1 bytes map to themselves, and the other 68 bytes map to
  chr(256), chr(257), ... in byte order, so no BPE symbol is whitespace or a
  control character.
  """
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class GPT2Tokenizer:
  """GPT-2 byte-level BPE from `vocab.json` and `merges.txt`.

  `<|endoftext|>` in the input text is encoded as plain text, not as the
  special token. Decoding replaces byte sequences that are not valid UTF-8
  (e.g. a sample cut inside a character) with U+FFFD.
  """

  kind = 'gpt2'

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
      raise DataError('GPT-2 vocab.json ids must be exactly 0..len(vocab)-1.')
    self.vocab = vocab
    self.merges = merges
    self._pieces = {i: piece for piece, i in vocab.items()}
    self._ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    if regex is not None:
      self._pattern = regex.compile(GPT2_PATTERN)
    else:
      self._pattern = re.compile(GPT2_PATTERN_FALLBACK)
    self._cache = {}

  @classmethod
  def from_files(cls, folder: str) -> 'GPT2Tokenizer':
    """Reads `folder`/vocab.json and `folder`/merges.txt."""
    vocab_path = os.path.join(folder, GPT2_VOCAB_FILE)
    merges_path = os.path.join(folder, GPT2_MERGES_FILE)
    for path in (vocab_path, merges_path):
      if not os.path.isfile(path):
        raise DataError(
            f'GPT-2 tokenizer file not found: {path}. The folder needs vocab.json and merges.txt.')

    with open(vocab_path, encoding='utf-8') as f:
      vocab = json.load(f)
    merges = []
    with open(merges_path, encoding='utf-8') as f:
      for line_number, line in enumerate(f, start=1):
        line = line.rstrip('\n')
        if not line or line.startswith('#version'):
          continue
        pair = line.split(' ')
        if len(pair) != 2:
          raise DataError(f'{merges_path} line {line_number}: expected two pieces, got {line!r}.')
        merges.append((pair[0], pair[1]))
    return cls(vocab, merges)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def separator_id(self) -> Optional[int]:
    return self.vocab.get(END_OF_TEXT)

  def _bpe(self, word: str) -> list[str]:
    """Applies the merges to one byte-encoded pre-token, lowest rank first."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word)

    while len(parts) > 1:
      pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
      best = min(pairs, key=lambda pair: self._ranks.get(pair, float('inf')))
      if best not in self._ranks:
        break

      merged = []
      i = 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged

    self._cache[word] = parts
    return parts

  def pre_tokenize(self, text: str) -> list[str]:
    """Splits text into the words that BPE merges within, e.g. "don't go" -> ['don', "'t", ' go']."""
    return self._pattern.findall(text)

  def encode(self, text: str) -> np.ndarray:
    ids = []
    for pre_token in self.pre_tokenize(text):
      word = ''.join(self._byte_encoder[b] for b in pre_token.encode('utf-8'))
      for piece in self._bpe(word):
        if piece not in self.vocab:
          raise DataError(f'GPT-2 piece {piece!r} is not in vocab.json; the vocabulary is incomplete.')
        ids.append(self.vocab[piece])
    return np.asarray(ids, dtype=np.int32)

  def _decode_run(self, ids) -> str:
    text = ''.join(self._pieces[i] for i in ids)
    return bytes(self._byte_decoder[c] for c in text).decode('utf-8', errors='replace')

  def decode(self, ids: Sequence[int]) -> str:
    return _decode_runs(ids, self.vocab_size, self._decode_run)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, GPT2_VOCAB_FILE), 'w', encoding='utf-8') as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, GPT2_MERGES_FILE), 'w', encoding='utf-8') as f:
      f.write('#version: 0.2\n')
      f.writelines(f'{a} {b}\n' for a, b in self.merges)
    _write_tokenizer_json(directory, self.kind, {
        'vocab_file': GPT2_VOCAB_FILE,
        'merges_file': GPT2_MERGES_FILE,
        'fingerprint': self.fingerprint(),
    })

  def fingerprint(self) -> str:
    vocab = json.dumps(self.vocab, sort_keys=True, ensure_ascii=False).encode('utf-8')
    merges = '\n'.join(f'{a} {b}' for a, b in self.merges).encode('utf-8')
    return _short_hash(self.kind.encode(), vocab, merges)


# ---------------------------------------------------------------------------
# Building, saving and loading.


def build_tokenizer(data_config, documents: Sequence[str]) -> Tokenizer:
  """Builds the tokenizer named by `data_config.tokenizer`.

  'char' and 'sentencepiece' are built from `documents`. 'gpt2' reads
  vocab.json and merges.txt from `data_config.tokenizer_path`, which is
  resolved like the data paths (against $MCD_DATA_DIR when relative).
  """
  kind = data_config.tokenizer
  if kind == 'char':
    tokenizer = CharTokenizer.from_documents(documents)
  elif kind == 'sentencepiece':
    tokenizer = SentencePieceTokenizer.train(documents, int(data_config.vocab_size))
  elif kind == 'gpt2':
    folder = data_config.get('tokenizer_path', '')
    if not folder:
      raise DataError(
          "tokenizer 'gpt2' needs data_config.tokenizer_path: a folder with "
          'vocab.json and merges.txt.')
    tokenizer = GPT2Tokenizer.from_files(os.path.join(corpus.data_dir(), folder))
  else:
    raise DataError(
        f"Unknown tokenizer {kind!r}. Choose one of 'char', 'sentencepiece', 'gpt2'.")

  logging.info('Built %s tokenizer: vocab_size=%d, fingerprint=%s.', kind,
               tokenizer.vocab_size, tokenizer.fingerprint())
  return tokenizer


def has_tokenizer(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, TOKENIZER_FILE))


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads the tokenizer that `save` wrote into `directory`."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise DataError(f'No {TOKENIZER_FILE} in {directory}: save a tokenizer there first.')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DataError(
        f'{path} is corrupt ({error}). Copy the tokenizer folder from the run that '
        'trained the checkpoint, or use a new workdir.') from error
  kind, data = saved.get('type'), saved.get('data', {})

  if kind == 'char':
    return CharTokenizer(data['characters'])

  if kind == 'sentencepiece':
    with open(os.path.join(directory, data['model_file']), 'rb') as f:
      model_proto = f.read()
    if hashlib.sha256(model_proto).hexdigest() != data['model_sha256']:
      raise DataError(
          f'{data["model_file"]} in {directory} does not match the sha256 in {TOKENIZER_FILE}.')
    return SentencePieceTokenizer(model_proto)

  if kind == 'gpt2':
    tokenizer = GPT2Tokenizer.from_files(directory)
    if tokenizer.fingerprint() != data['fingerprint']:
      raise DataError(
          f'vocab.json/merges.txt in {directory} do not match the fingerprint in {TOKENIZER_FILE}.')
    return tokenizer

  raise DataError(f'{path} has unknown tokenizer type {kind!r}.')

