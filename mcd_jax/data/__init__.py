"""Corpora, tokenizers and the input pipeline of mcd_jax.

The trainer calls `make_datasets(data_config, tokenizer_dir, process_index,
process_count)`. The pieces it is made of are exported here for tests, the
command line and notebooks.
"""

from mcd_jax.data.corpus import DataError
from mcd_jax.data.corpus import load_documents
from mcd_jax.data.corpus import markov_source
from mcd_jax.data.corpus import MarkovSource
from mcd_jax.data.pipeline import Datasets
from mcd_jax.data.pipeline import make_datasets
from mcd_jax.data.pipeline import pack
from mcd_jax.data.pipeline import PackedIterator
from mcd_jax.data.pipeline import split_documents
from mcd_jax.data.pipeline import validation_batches
from mcd_jax.data.tokenizers import build_tokenizer
from mcd_jax.data.tokenizers import CharTokenizer
from mcd_jax.data.tokenizers import GPT2Tokenizer
from mcd_jax.data.tokenizers import load_tokenizer
from mcd_jax.data.tokenizers import MASK_PLACEHOLDER
from mcd_jax.data.tokenizers import SentencePieceTokenizer
from mcd_jax.data.tokenizers import Tokenizer
