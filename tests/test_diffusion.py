"""Tests for the training losses: masked diffusion (mcd_jax.diffusion) and next-token (mcd_jax.autoregressive)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcd_jax import autoregressive
from mcd_jax import diffusion
from mcd_jax import models
from mcd_jax import schedules

K = 11
MASK_ID = K
LENGTH = 16
BATCH = 4
SCHEDULE_NAMES = ('linear', 'cosine', 'loglinear')


def make_model(causal=False, time_conditioning=False):
  return models.Transformer(
      vocab_size=K if causal else K + 1, output_size=K, d_model=32,
      num_layers=2, num_heads=4, mlp_dim=64, causal=causal,
      time_conditioning=time_conditioning)


@functools.lru_cache(maxsize=None)
def init_params(model, seed=0):
  init = jax.jit(model.init)
  variables = init(jax.random.PRNGKey(seed),
                   jnp.zeros((BATCH, LENGTH), jnp.int32),
                   jnp.full((BATCH,), 0.5))
  return nn.meta.unbox(variables['params'])


# Jitted versions of the functions under test, with the model and schedule static.
elbo_terms = jax.jit(diffusion.elbo_terms,
                     static_argnames=('model', 'schedule', 'mask_id'))
elbo_loss = jax.jit(diffusion.elbo_loss,
                    static_argnames=('model', 'schedule', 'mask_id', 'train'))
next_token_loss = jax.jit(autoregressive.next_token_loss,
                          static_argnames=('model', 'train'))
sequence_log_likelihood = jax.jit(autoregressive.sequence_log_likelihood,
                                  static_argnames=('model',))


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, tokens, t, padding_mask):
  return model.apply({'params': params}, tokens, t, padding_mask=padding_mask)


def random_tokens(seed, shape=(BATCH, LENGTH)):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, K)


def numpy_log_softmax(logits):
  logits = np.asarray(logits, dtype=np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# -- times and corruption ------------------------------------------------------


def test_antithetic_times_are_stratified():
  batch_size = 8
  for seed in range(5):
    t = np.asarray(diffusion.sample_times(jax.random.PRNGKey(seed), batch_size))
    assert t.dtype == np.float32
    assert t.shape == (batch_size,)
    assert np.all((t >= 0.0) & (t < 1.0))
    # Exactly one time in each stratum [b / B, (b + 1) / B).
    strata = np.floor(t * batch_size).astype(int)
    assert sorted(strata.tolist()) == list(range(batch_size))
    # All times share one offset modulo 1 / B.
    offsets = np.mod(t, 1.0 / batch_size)
    np.testing.assert_allclose(offsets, offsets[0], atol=1e-6)


def test_independent_times_in_unit_interval():
  t = np.asarray(diffusion.sample_times(jax.random.PRNGKey(0), 1000,
                                        antithetic=False))
  assert np.all((t >= 0.0) & (t < 1.0))
  # Not stratified: some stratum of width 1/1000 contains two or more times.
  assert len(set(np.floor(t * 1000).astype(int).tolist())) < 1000


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_corrupt_masks_with_probability_one_minus_alpha(name):
  schedule = schedules.get_schedule(name)
  tokens = random_tokens(0, (64, 256))
  t = jnp.full((64,), 0.3)
  z_t = diffusion.corrupt(jax.random.PRNGKey(1), tokens, t, schedule, MASK_ID)

  is_masked = np.asarray(z_t == MASK_ID)
  np.testing.assert_array_equal(np.asarray(z_t)[~is_masked],
                                np.asarray(tokens)[~is_masked])
  # Binomial with n = 16,384 draws: 5 standard errors bound a fixed-seed miss.
  p = 1.0 - float(schedule.alpha(0.3))
  n = is_masked.size
  assert abs(is_masked.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_corrupt_at_endpoints():
  schedule = schedules.linear()
  tokens = random_tokens(2)
  rng = jax.random.PRNGKey(3)
  clean = diffusion.corrupt(rng, tokens, jnp.zeros((BATCH,)), schedule, MASK_ID)
  np.testing.assert_array_equal(clean, tokens)
  masked = diffusion.corrupt(rng, tokens, jnp.ones((BATCH,)), schedule, MASK_ID)
  assert bool(jnp.all(masked == MASK_ID))


# -- SUBS ------------------------------------------------------------------------


def test_subs_copies_unmasked_and_normalises_masked():
  logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (BATCH, LENGTH, K))
  tokens = random_tokens(1)
  z_t = jnp.where(jnp.arange(LENGTH)[None, :] % 3 == 0, MASK_ID, tokens)
  log_probs = np.asarray(diffusion.subs_log_probs(logits, z_t, MASK_ID))
  is_masked = np.asarray(z_t == MASK_ID)

  assert log_probs.shape == (BATCH, LENGTH, K)
  assert np.all(np.isfinite(log_probs))
  # Unmasked: probability 1 on the input token, exactly 0 elsewhere.
  probs = np.exp(log_probs)
  copy = np.eye(K)[np.asarray(tokens)]
  np.testing.assert_array_equal(probs[~is_masked], copy[~is_masked])
  # Masked: a normalised softmax over the K real tokens.
  np.testing.assert_allclose(probs[is_masked].sum(axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(log_probs[is_masked],
                             numpy_log_softmax(logits)[is_masked], atol=1e-5)


def test_subs_gradients_zero_at_unmasked():
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4, K))
  z_t = jnp.array([[MASK_ID, 2, MASK_ID, 5]])
  gradient = jax.grad(
      lambda x: diffusion.subs_log_probs(x, z_t, MASK_ID).sum())(logits)

  assert bool(jnp.all(jnp.isfinite(gradient)))
  assert float(jnp.abs(gradient[0, 1]).max()) == 0.0
  assert float(jnp.abs(gradient[0, 0]).max()) > 0.0


# -- ELBO ------------------------------------------------------------------------


def numpy_elbo_weight(name, t):
  """-α'_t / (1 - α_t), written out per schedule."""
  if name == 'linear':
    return 1.0 / t
  if name == 'cosine':
    return (math.pi / 2) * math.sin(math.pi * t / 2) / (1 - math.cos(math.pi * t / 2))
  return 1.0 / t  # log-linear: (1 - ε) / ((1 - ε) t)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_elbo_terms_match_numpy(name):
  schedule = schedules.get_schedule(name)
  model = make_model()
  params = init_params(model)
  tokens = np.asarray(random_tokens(4))
  padding_mask = np.ones((BATCH, LENGTH), dtype=bool)
  padding_mask[1, 10:] = False
  padding_mask[3, 4:] = False
  masked = np.array(jax.random.bernoulli(jax.random.PRNGKey(5), 0.5,
                                           (BATCH, LENGTH)))
  masked[1, 12] = True  # a masked padded position, which must not count
  z_t = np.where(masked, MASK_ID, tokens)
  t = np.array([0.1, 0.35, 0.6, 0.95], dtype=np.float32)

  nats, num_tokens, num_masked = elbo_terms(
      model, params, jnp.asarray(tokens), jnp.asarray(z_t), jnp.asarray(t),
      schedule, MASK_ID, jnp.asarray(padding_mask))

  logits = apply(model, params, jnp.asarray(z_t), jnp.asarray(t),
                 jnp.asarray(padding_mask))
  log_probs = numpy_log_softmax(logits)
  expected = np.zeros(BATCH)
  for b in range(BATCH):
    for i in range(LENGTH):
      if masked[b, i] and padding_mask[b, i]:
        expected[b] -= log_probs[b, i, tokens[b, i]]
    expected[b] *= numpy_elbo_weight(name, float(t[b]))

  np.testing.assert_allclose(nats, expected, rtol=1e-4)
  np.testing.assert_array_equal(num_tokens, padding_mask.sum(axis=1))
  np.testing.assert_array_equal(num_masked, (masked & padding_mask).sum(axis=1))


def test_elbo_loss_normalises_by_real_tokens():
  schedule = schedules.cosine()
  model = make_model()
  params = init_params(model)
  tokens = random_tokens(6)
  padding_mask = jnp.arange(LENGTH)[None, :] < jnp.array([[16], [9], [12], [3]])
  rng = jax.random.PRNGKey(7)

  loss, metrics = elbo_loss(model, params, rng, tokens, schedule,
                                      MASK_ID, padding_mask, train=False)

  # Rebuild the same draw: elbo_loss splits rng into (time, mask, dropout) keys.
  time_rng, mask_rng, _ = jax.random.split(rng, 3)
  t = diffusion.sample_times(time_rng, BATCH)
  z_t = diffusion.corrupt(mask_rng, tokens, t, schedule, MASK_ID)
  nats, _, num_masked = elbo_terms(model, params, tokens, z_t, t,
                                             schedule, MASK_ID, padding_mask)
  num_real = 16 + 9 + 12 + 3
  np.testing.assert_allclose(loss, nats.sum() / num_real, rtol=1e-6)
  np.testing.assert_allclose(metrics['bits_per_token'], loss / math.log(2),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['masked_fraction'],
                             num_masked.sum() / num_real, rtol=1e-6)
  assert float(metrics['num_tokens']) == num_real
  assert float(loss) > 0.0


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_elbo_finite_at_time_endpoints(name):
  schedule = schedules.get_schedule(name)
  model = make_model(time_conditioning=True)
  params = init_params(model)
  tokens = random_tokens(8)

  @jax.jit
  @jax.value_and_grad
  def loss_and_gradients(params, z_t, t):
    nats, num_tokens, _ = diffusion.elbo_terms(model, params, tokens, z_t, t,
                                               schedule, MASK_ID)
    return nats.sum() / num_tokens.sum()

  for time in (0.0, 1.0):
    t = jnp.full((BATCH,), time)
    # Half the positions masked, even at t = 0 where corrupt() masks none.
    half_masked = jnp.where(jnp.arange(LENGTH)[None, :] % 2 == 0, MASK_ID,
                            tokens)
    drawn = diffusion.corrupt(jax.random.PRNGKey(0), tokens, t, schedule,
                              MASK_ID)
    for z_t in (half_masked, drawn):
      loss, gradients = loss_and_gradients(params, z_t, t)
      assert bool(jnp.isfinite(loss)), (time, z_t)
      assert float(loss) >= 0.0, (time, z_t)
      for leaf in jax.tree_util.tree_leaves(gradients):
        assert bool(jnp.all(jnp.isfinite(leaf))), (time, z_t)


def test_validation_elbo_aggregates_over_tokens():
  schedule = schedules.linear()
  model = make_model()
  params = init_params(model)
  first = {'tokens': random_tokens(9),
           'padding_mask': jnp.arange(LENGTH)[None, :] < jnp.array([[16], [5], [8], [2]])}
  second = random_tokens(10)
  rng = jax.random.PRNGKey(11)

  result = diffusion.validation_elbo(model, params, rng, [first, second],
                                     schedule, MASK_ID, num_time_samples=2)

  # Batch i uses the key fold_in(rng, i).
  nats_0, tokens_0 = diffusion.elbo_nats(
      model, params, jax.random.fold_in(rng, 0), first['tokens'], schedule,
      MASK_ID, first['padding_mask'], num_time_samples=2)
  nats_1, tokens_1 = diffusion.elbo_nats(
      model, params, jax.random.fold_in(rng, 1), second, schedule, MASK_ID,
      num_time_samples=2)
  assert float(tokens_0) == 31
  assert float(tokens_1) == BATCH * LENGTH
  expected = (float(nats_0) + float(nats_1)) / (31 + BATCH * LENGTH)
  assert result['num_tokens'] == 31 + BATCH * LENGTH
  assert result['nats_per_token'] == pytest.approx(expected, rel=1e-5)
  assert result['bits_per_token'] == pytest.approx(expected / math.log(2))
  assert result['perplexity_bound'] == pytest.approx(math.exp(expected))


# -- autoregressive --------------------------------------------------------------


def test_next_token_loss_matches_numpy():
  model = make_model(causal=True)
  params = init_params(model)
  tokens = np.asarray(random_tokens(12))
  lengths = np.array([16, 7, 12, 1])
  padding_mask = np.arange(LENGTH)[None, :] < lengths[:, None]

  loss, metrics = next_token_loss(
      model, params, jnp.asarray(tokens), jnp.asarray(padding_mask))
  log_prob, num_tokens = sequence_log_likelihood(
      model, params, jnp.asarray(tokens), jnp.asarray(padding_mask))

  logits = apply(model, params, jnp.asarray(tokens), None,
                 jnp.asarray(padding_mask))
  log_probs = numpy_log_softmax(logits)
  expected = np.zeros(BATCH)
  for b in range(BATCH):
    # The output at position i predicts token i + 1. Token 0 is never predicted.
    for i in range(lengths[b] - 1):
      expected[b] += log_probs[b, i, tokens[b, i + 1]]

  np.testing.assert_allclose(log_prob, expected, rtol=1e-5)
  np.testing.assert_array_equal(num_tokens, lengths - 1)
  np.testing.assert_allclose(loss, -expected.sum() / (lengths - 1).sum(),
                             rtol=1e-5)
  assert float(metrics['num_tokens']) == (lengths - 1).sum()
  np.testing.assert_allclose(metrics['perplexity'], np.exp(loss), rtol=1e-6)


# -- training lowers both losses -----------------------------------------------


def repetitive_batch(rng, batch_size=16):
  """Sequences that repeat one of three short patterns from a random phase."""
  patterns = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]])
  pattern_rng, phase_rng = jax.random.split(rng)
  choice = jax.random.randint(pattern_rng, (batch_size,), 0, len(patterns))
  phase = jax.random.randint(phase_rng, (batch_size, 1), 0, 4)
  positions = (jnp.arange(LENGTH)[None, :] + phase) % 4
  return jnp.asarray(patterns)[choice[:, None], positions]


def train(loss_fn, params, num_steps):
  """Runs Adam steps on fresh repetitive batches and returns the loss before and after."""
  optimizer = optax.adam(3e-3)
  state = optimizer.init(params)
  evaluation_batch = repetitive_batch(jax.random.PRNGKey(1000), 64)
  evaluation_rng = jax.random.PRNGKey(1001)

  @jax.jit
  def step(params, state, rng):
    batch_rng, loss_rng = jax.random.split(rng)
    batch = repetitive_batch(batch_rng)
    gradients = jax.grad(lambda p: loss_fn(p, batch, loss_rng))(params)
    updates, state = optimizer.update(gradients, state)
    return optax.apply_updates(params, updates), state

  evaluate = jax.jit(lambda p: loss_fn(p, evaluation_batch, evaluation_rng))
  before = float(evaluate(params))
  for index in range(num_steps):
    params, state = step(params, state, jax.random.PRNGKey(index))
  return before, float(evaluate(params))


def test_training_lowers_diffusion_loss():
  model = make_model()
  schedule = schedules.loglinear()

  def loss_fn(params, batch, rng):
    return diffusion.elbo_loss(model, params, rng, batch, schedule, MASK_ID)[0]

  before, after = train(loss_fn, init_params(model), num_steps=60)
  assert after < 0.7 * before, (before, after)


def test_training_lowers_autoregressive_loss():
  model = make_model(causal=True)

  def loss_fn(params, batch, rng):
    del rng
    return autoregressive.next_token_loss(model, params, batch)[0]

  before, after = train(loss_fn, init_params(model), num_steps=60)
  # Every token but the first follows from the one or two before it, so the
  # loss can fall far below the uniform predictor's log K = 2.40 nats.
  assert after < 0.5 * before, (before, after)
