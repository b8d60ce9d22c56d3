"""Tests for mcd_jax.decoding: the KV-cache path matches the full causal pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import decoding
from mcd_jax.models import transformer

K = 11
BATCH = 3
LENGTH = 12


def make_model(**overrides):
  fields = dict(vocab_size=K, output_size=K, d_model=32, num_layers=2, num_heads=4,
                mlp_dim=64, causal=True)
  fields.update(overrides)
  return transformer.Transformer(**fields)


def init_params(model, seed=0):
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(seed), tokens, None)['params'])


def random_tokens(seed):
  return jax.random.randint(jax.random.key(seed), (BATCH, LENGTH), 0, K)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_cached_logits_match_full_pass(scan_layers):
  model = make_model(scan_layers=scan_layers)
  params = init_params(model)
  tokens = random_tokens(1)

  full = model.apply({'params': params}, tokens, None)
  cached = decoding.cached_logits(model, params, tokens)

  assert cached.shape == (BATCH, LENGTH, K)
  # float32 with O(1) logits: the two paths differ only in summation order.
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_cached_logits_see_no_future_tokens():
  model = make_model()
  params = init_params(model)
  tokens = random_tokens(2)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % K)

  before = decoding.cached_logits(model, params, tokens)
  after = decoding.cached_logits(model, params, changed)

  np.testing.assert_array_equal(before[:, :-1], after[:, :-1])
  assert not np.allclose(before[:, -1], after[:, -1])


def test_cached_sample_matches_uncached():
  model = make_model()
  params = init_params(model)
  prompt = np.asarray(random_tokens(3))[:, :2]

  cached = decoding.sample(model, params, jax.random.key(4), prompt, seq_len=LENGTH)
  uncached = decoding.sample(model, params, jax.random.key(4), prompt, seq_len=LENGTH,
                             use_cache=False)
  other_key = decoding.sample(model, params, jax.random.key(5), prompt, seq_len=LENGTH)

  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached[:, :2], prompt)
  assert cached.dtype == jnp.int32
  assert int(cached.min()) >= 0
  assert int(cached.max()) < K
  # 3 × 10 drawn tokens from 11 classes: equal by chance with probability ~1e-30.
  assert not np.array_equal(cached, other_key)


def test_sample_respects_forbidden_and_prompt_shape():
  model = make_model()
  params = init_params(model)

  tokens = decoding.sample(model, params, jax.random.key(6), [1, 2, 3], seq_len=LENGTH,
                           batch_size=BATCH, forbidden=[0, 5])

  assert tokens.shape == (BATCH, LENGTH)
  np.testing.assert_array_equal(tokens[:, :3], np.tile([1, 2, 3], (BATCH, 1)))
  assert not np.isin(np.asarray(tokens), [0, 5]).any()


@pytest.mark.parametrize('prompt, message', [
    (np.zeros((BATCH, 0), np.int32), 'between 1 and seq_len'),
    (np.full((BATCH, 1), K, np.int32), 'outside'),
    (np.zeros((BATCH, LENGTH + 1), np.int32), 'between 1 and seq_len'),
])
def test_sample_rejects_invalid_prompt(prompt, message):
  model = make_model()
  params = init_params(model)
  with pytest.raises(ValueError, match=message):
    decoding.sample(model, params, jax.random.key(0), prompt, seq_len=LENGTH)


def test_decode_requires_causal_model():
  model = make_model(causal=False, vocab_size=K + 1)
  with pytest.raises(ValueError, match='causal'):
    decoding.init_cache(model, BATCH, LENGTH)
