"""Tests for the transformer in mcd_jax.models: shapes, axis names, masks, time conditioning."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcd_jax import models
from mcd_jax.models import transformer

K = 11
LENGTH = 16
BATCH = 2
# The rules table the sharding code uses, reproduced to check every name maps.
AXIS_RULES = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'),
              ('heads', 'tensor'), ('vocab', 'tensor'), ('kv', None),
              ('length', None), ('layers', None), ('time', None))
AXIS_NAMES = {name for name, _ in AXIS_RULES}


def make_model(**overrides):
  fields = dict(vocab_size=K + 1, output_size=K, d_model=32, num_layers=2,
                num_heads=4, mlp_dim=64)
  fields.update(overrides)
  return models.Transformer(**fields)


def random_tokens(seed, vocab_size=K + 1):
  return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, LENGTH), 0,
                            vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def init_boxed(model, rng):
  return model.init(rng, jnp.zeros((BATCH, LENGTH), jnp.int32),
                    jnp.full((BATCH,), 0.5))['params']


@functools.lru_cache(maxsize=None)
def init_params(model, seed=0):
  return nn.meta.unbox(init_boxed(model, jax.random.PRNGKey(seed)))


def perturb(params, seed=1, scale=0.3):
  """Adds Gaussian noise to every leaf, so zero-initialised gates become active."""
  # NumPy noise: one jax.random call per leaf would compile for each shape.
  generator = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: leaf + scale * generator.standard_normal(
          leaf.shape).astype(np.float32), params)


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, tokens, t=None, padding_mask=None):
  return model.apply({'params': params}, tokens, t, padding_mask=padding_mask)


def test_bfloat16_compute_returns_float32_logits():
  params = init_params(make_model())
  tokens = random_tokens(4)
  reference = apply(make_model(), params, tokens)
  low_precision = apply(make_model(dtype=jnp.bfloat16), params, tokens)

  assert reference.shape == (BATCH, LENGTH, K)
  assert reference.dtype == jnp.float32
  assert low_precision.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits, so logits of size ~1 agree to a few 1e-2.
  np.testing.assert_allclose(low_precision, reference, atol=0.1)
  assert not np.array_equal(np.asarray(low_precision), np.asarray(reference))


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('time_conditioning', [False, True])
def test_every_parameter_has_logical_axes(scan_layers, time_conditioning):
  model = make_model(scan_layers=scan_layers,
                     time_conditioning=time_conditioning)
  # eval_shape keeps the boxes around abstract values and compiles nothing.
  boxed = jax.eval_shape(init_boxed, model, jax.random.PRNGKey(0))
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)

  assert len(leaves) > 10
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert is_box(leaf), f'{where} has no logical axis names'
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) <= AXIS_NAMES, where
    in_blocks = 'layers' in where or 'block_' in where
    assert ('layers' in leaf.names) == (scan_layers and in_blocks), where

  specs = nn.get_partition_spec(boxed)
  for spec in jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    # Raises on repeated names, which no mesh could shard.
    nn.logical_to_mesh_axes(tuple(spec), AXIS_RULES)


def test_causal_attention_masks_the_future():
  model = make_model(causal=True, vocab_size=K)
  params = init_params(model)
  tokens = random_tokens(5, vocab_size=K)
  changed_position = 8
  changed = tokens.at[:, changed_position].set(
      (tokens[:, changed_position] + 1) % K)

  difference = jnp.abs(apply(model, params, changed) - apply(model, params, tokens))
  assert float(difference[:, :changed_position].max()) == 0.0
  assert float(difference[:, changed_position:].max()) > 1e-4


def test_bidirectional_attention_sees_the_future():
  model = make_model()
  params = init_params(model)
  tokens = random_tokens(6)
  changed_position = 8
  changed = tokens.at[:, changed_position].set(
      (tokens[:, changed_position] + 1) % K)

  difference = jnp.abs(apply(model, params, changed) - apply(model, params, tokens))
  assert float(difference[:, :changed_position].max()) > 1e-4


@pytest.mark.parametrize('causal, time_conditioning', [(False, True),
                                                       (True, False)])
def test_padded_tokens_do_not_change_real_outputs(causal, time_conditioning):
  vocab_size = K if causal else K + 1
  model = make_model(causal=causal, time_conditioning=time_conditioning,
                     vocab_size=vocab_size)
  params = perturb(init_params(model))
  t = jnp.array([0.3, 0.9])
  num_real = jnp.array([11, 6])
  padding_mask = jnp.arange(LENGTH)[None, :] < num_real[:, None]
  tokens = random_tokens(7, vocab_size)
  other_padding = jnp.where(padding_mask, tokens, random_tokens(8, vocab_size))
  assert not np.array_equal(np.asarray(tokens), np.asarray(other_padding))

  logits = apply(model, params, tokens, t, padding_mask)
  other_logits = apply(model, params, other_padding, t, padding_mask)
  difference = jnp.abs(logits - other_logits)
  real_difference = jnp.where(padding_mask[..., None], difference, 0.0)
  assert float(real_difference.max()) <= 1e-6

  if causal:
    return
  # Without the padding mask the same change reaches the real positions.
  unmasked_difference = jnp.abs(apply(model, params, tokens, t)
                                - apply(model, params, other_padding, t))
  assert float(jnp.where(padding_mask[..., None], unmasked_difference,
                         0.0).max()) > 1e-4


def test_time_conditioning_uses_t():
  model = make_model(time_conditioning=True)
  params = init_params(model)
  tokens = random_tokens(9)
  early, late = jnp.full((BATCH,), 0.2), jnp.full((BATCH,), 0.8)

  # adaLN-zero: every modulation is zero at init, so t has no effect yet.
  np.testing.assert_array_equal(apply(model, params, tokens, early),
                                apply(model, params, tokens, late))

  trained = perturb(params)
  difference = jnp.abs(apply(model, trained, tokens, early)
                       - apply(model, trained, tokens, late))
  assert float(difference.max()) > 1e-3


def test_time_agnostic_model_ignores_t():
  model = make_model(time_conditioning=False)
  params = perturb(init_params(model))
  tokens = random_tokens(10)

  reference = apply(model, params, tokens, jnp.full((BATCH,), 0.2))
  np.testing.assert_array_equal(apply(model, params, tokens, jnp.full((BATCH,), 0.8)),
                                reference)
  np.testing.assert_array_equal(apply(model, params, tokens, None), reference)


def test_time_conditioned_model_requires_t():
  model = make_model(time_conditioning=True)
  params = init_params(model)
  with pytest.raises(ValueError, match='t is None'):
    apply(model, params, random_tokens(0), None)


def test_odd_head_dim_rejected():
  model = make_model(d_model=36, num_heads=4)  # head dim 9
  with pytest.raises(ValueError, match='even integer'):
    model.init(jax.random.PRNGKey(0), random_tokens(0))


def test_scan_and_remat_match_loop():
  time_conditioning = True
  looped = make_model(time_conditioning=time_conditioning)
  params = perturb(init_params(looped))
  tokens = random_tokens(11)
  t = jnp.array([0.1, 0.6])
  reference = apply(looped, params, tokens, t)

  remat = make_model(time_conditioning=time_conditioning, remat=True)
  np.testing.assert_allclose(apply(remat, params, tokens, t), reference,
                             rtol=1e-4, atol=1e-4)

  scanned = make_model(time_conditioning=time_conditioning, scan_layers=True,
                       remat=True)
  scanned_params = {k: v for k, v in params.items()
                    if not k.startswith('block_')}
  scanned_params['layers'] = jax.tree_util.tree_map(
      lambda *layers: jnp.stack(layers), params['block_0'], params['block_1'])
  # Scan and loop may order float32 sums differently. Logits here reach about 20.
  np.testing.assert_allclose(apply(scanned, scanned_params, tokens, t),
                             reference, rtol=1e-4, atol=1e-4)


def test_dropout_only_when_not_deterministic():
  model = make_model(dropout_rate=0.5)
  params = init_params(make_model())
  tokens = random_tokens(12)
  reference = model.apply({'params': params}, tokens, None, deterministic=True)
  no_dropout = make_model()
  np.testing.assert_allclose(apply(no_dropout, params, tokens), reference,
                             atol=1e-5)

  dropped = model.apply({'params': params}, tokens, None, deterministic=False,
                        rngs={'dropout': jax.random.PRNGKey(0)})
  assert float(jnp.abs(dropped - reference).max()) > 1e-3


def test_from_config_and_counts():
  config = ml_collections.ConfigDict(dict(
      d_model=32, num_layers=2, num_heads=4, mlp_dim=64, dropout_rate=0.0,
      time_conditioning=False, dtype='bfloat16', remat=False))
  model = models.from_config(config, vocab_size=K + 1, output_size=K,
                             causal=True)
  assert model.causal
  assert not model.scan_layers
  assert model.dtype == 'bfloat16'

  params = jax.eval_shape(init_boxed, model, jax.random.PRNGKey(0))
  # Embedding, per block (q, k, v, out, two norms, MLP with biases), final norm
  # and head, counted by hand. The embedding rows (K + 1) and head outputs (K)
  # are padded to 128.
  d, mlp = 32, 64
  per_block = 4 * d * d + 2 * 2 * d + (d * mlp + mlp) + (mlp * d + d)
  expected = 128 * d + 2 * per_block + 2 * d + (d * 128 + 128)
  assert models.count_params(params) == expected

  matmul = 2 * (4 * d * d + 2 * d * mlp) + d * K  # 16,736
  assert models.matmul_params_per_token(model) == matmul
  assert models.forward_flops_per_token(model, 16) == 2 * matmul + 4 * 2 * 16 * d
  assert models.train_flops_per_token(model, 16) == 3 * (2 * matmul + 4096)


def test_import_creates_no_backend():
  code = ('import mcd_jax.models, mcd_jax.diffusion, mcd_jax.autoregressive\n'
          'from jax._src import xla_bridge\n'
          'assert not xla_bridge._backends, xla_bridge._backends\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


def test_sinusoidal_features_shape_and_range():
  features = transformer.sinusoidal_time_features(jnp.array([0.0, 1.0]))
  assert features.shape == (2, transformer.TIME_EMBEDDING_DIM)
  half = transformer.TIME_EMBEDDING_DIM // 2
  np.testing.assert_allclose(features[0, :half], 1.0)  # cos(0)
  np.testing.assert_allclose(features[0, half:], 0.0)  # sin(0)
