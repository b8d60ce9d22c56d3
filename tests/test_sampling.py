"""Tests of mcd_jax.sampling with a tiny bidirectional, time-conditioned model.

Statistical checks use fixed seeds and compare each frequency from n draws
with its exact value p within 4 binomial standard errors, 4 sqrt(p (1 - p) / n).
Most tests share B = 4, L = 8, K = 5 and the cosine schedule, so that they
reuse compiled samplers.
"""

import collections
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import sampling
from mcd_jax import schedules

VOCAB_SIZE = 5  # K; the mask id is K.
BATCH_SIZE = 4
SEQ_LEN = 8
SAMPLERS = {'ancestral': sampling.ancestral_sample,
            'deterministic': sampling.deterministic_sample}

# Runs of TinyDenoiser.__call__: one per trace under jit and one per eager call.
MODEL_CALLS = collections.Counter()


class TinyDenoiser(nn.Module):
  """Embedding, a mean over positions for mixing, a time feature and a dense head."""
  vocab_size: int
  features: int = 16

  @nn.compact
  def __call__(self, tokens, t, deterministic=True):
    del deterministic
    MODEL_CALLS['count'] += 1
    x = nn.Embed(self.vocab_size + 1, self.features)(tokens)  # [B, L, D]
    x = x + jnp.mean(x, axis=1, keepdims=True)
    x = x + nn.Dense(self.features, name='time')(t[:, None])[:, None, :]
    return nn.Dense(self.vocab_size, name='head')(jnp.tanh(x))  # [B, L, K]


MODEL = TinyDenoiser(VOCAB_SIZE)


def init_params(seed=0, scale=3.0):
  params = MODEL.init(jax.random.key(seed), jnp.zeros((1, SEQ_LEN), jnp.int32),
                      jnp.zeros((1,)))['params']
  # Larger weights give sharp, context-dependent predictions.
  return jax.tree.map(lambda p: scale * p, params)


@pytest.fixture(scope='module')
def params():
  return init_params()


@pytest.fixture(scope='module')
def time_agnostic_params(params):
  """The same model with its time feature switched off."""
  return {**params, 'time': jax.tree.map(jnp.zeros_like, params['time'])}


@pytest.fixture(scope='module')
def biased_params(params):
  """Predicts token 0 with overwhelming probability at every position."""
  head = dict(params['head'])
  head['bias'] = jnp.zeros_like(head['bias']).at[0].set(40.0)
  return {**params, 'head': head}


def run(sampler, params, key, **overrides):
  settings = dict(batch_size=BATCH_SIZE, seq_len=SEQ_LEN, num_steps=16,
                  schedule='cosine', mask_id=VOCAB_SIZE)
  settings.update(overrides)
  return SAMPLERS[sampler](MODEL, params, key, **settings)


def binomial_bound(p, n):
  return 4.0 * math.sqrt(p * (1.0 - p) / n)


# ----------------------------------------------------------------------------
# Every position revealed, at every step count.


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
@pytest.mark.parametrize('num_steps', [1, 2, 3, 16, 1024])
def test_no_mask_left(sampler, num_steps, params):
  output = run(sampler, params, jax.random.key(num_steps), num_steps=num_steps)
  tokens = np.asarray(output.tokens)

  assert tokens.shape == (BATCH_SIZE, SEQ_LEN)
  assert tokens.dtype == np.int32
  assert (tokens != VOCAB_SIZE).all()
  assert ((tokens >= 0) & (tokens < VOCAB_SIZE)).all()
  np.testing.assert_array_equal(output.nfe, [num_steps] * BATCH_SIZE)


# ----------------------------------------------------------------------------
# Reveal probabilities and the law of the samplers.


def test_ancestral_step_reveal_probabilities():
  num_rows, seq_len = 1000, 100
  n = num_rows * seq_len // 2
  schedule = schedules.get_schedule('cosine')
  alpha_t, alpha_s = float(schedule.alpha(0.7)), float(schedule.alpha(0.4))
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  log_probs = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)),
                               (num_rows, seq_len, 4))
  # Even positions are masked; odd ones hold token 3 and must keep it.
  tokens = jnp.where(jnp.arange(seq_len) % 2 == 0, 4, 3) * jnp.ones((num_rows, 1), jnp.int32)

  step = jax.jit(lambda key, final: sampling.ancestral_step(
      key, tokens, log_probs, alpha_t, alpha_s, mask_id=4, final=final))
  out = np.asarray(step(jax.random.key(0), False))
  final = np.asarray(step(jax.random.key(1), True))

  reveal = (alpha_s - alpha_t) / (1 - alpha_t)
  expected = np.append(reveal * probs, 1 - reveal)  # tokens 0 … 3, then the mask
  counts = np.bincount(out[:, 0::2].ravel(), minlength=5)
  for k, p in enumerate(expected):
    assert abs(counts[k] / n - p) < binomial_bound(p, n), (k, counts[k] / n, p)
  assert (out[:, 1::2] == 3).all()
  assert (final != 4).all()
  assert (final[:, 1::2] == 3).all()


def exact_sequence_law(params, *, seq_len, num_steps, schedule, temperature):
  """Enumerates z_t over {0 … K-1, mask}^L step by step; returns {sequence: p}."""
  mask_id = VOCAB_SIZE
  states = {(mask_id,) * seq_len: 1.0}
  for k in range(num_steps):
    t, s = 1.0 - k / num_steps, 1.0 - (k + 1) / num_steps
    alpha_t, alpha_s = float(schedule.alpha(t)), float(schedule.alpha(s))
    reveal = 1.0 if k == num_steps - 1 else (alpha_s - alpha_t) / (1.0 - alpha_t)
    following = collections.defaultdict(float)
    for state, p_state in states.items():
      logits = np.asarray(MODEL.apply({'params': params}, jnp.array([state]),
                                      jnp.array([t], jnp.float32))[0], np.float64)
      tempered = logits / temperature
      probs = np.exp(tempered - np.logaddexp.reduce(tempered, axis=-1, keepdims=True))
      options = []
      for i, token in enumerate(state):
        if token != mask_id:
          options.append([(token, 1.0)])
        else:
          options.append([(mask_id, 1.0 - reveal)]
                         + [(j, reveal * probs[i, j]) for j in range(VOCAB_SIZE)])
      for combination in itertools.product(*options):
        tokens = tuple(token for token, _ in combination)
        following[tokens] += p_state * math.prod(p for _, p in combination)
    states = following
  return states


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_sequence_law_matches_enumeration(sampler, params):
  # L = 2 positions: the position revealed second is conditioned on the first
  # through the mean over positions, so reveal order and timing change the law.
  n, seq_len, num_steps, temperature = 20_000, 2, 3, 0.7
  schedule = schedules.get_schedule('cosine')
  exact = exact_sequence_law(params, seq_len=seq_len, num_steps=num_steps,
                             schedule=schedule, temperature=temperature)
  output = run(sampler, params, jax.random.key(11), batch_size=n, seq_len=seq_len,
               num_steps=num_steps, schedule=schedule, temperature=temperature)
  counts = collections.Counter(map(tuple, np.asarray(output.tokens).tolist()))

  assert sum(exact.values()) == pytest.approx(1.0, abs=1e-9)
  assert set(counts) <= set(exact)
  for sequence, p in exact.items():
    if VOCAB_SIZE in sequence:
      assert p == 0.0
      assert counts[sequence] == 0
    else:
      assert abs(counts[sequence] / n - p) < binomial_bound(p, n), (sequence, p)


# ----------------------------------------------------------------------------
# The deterministic sampler.


def test_deterministic_same_noise_same_text(params):
  first = run('deterministic', params, jax.random.key(5))
  again = run('deterministic', params, jax.random.key(5))
  other = run('deterministic', params, jax.random.key(6))

  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()


def test_deterministic_batch_size_invariance(params):
  key = jax.random.key(7)
  whole = np.asarray(run('deterministic', params, key, batch_size=8).tokens)
  first = np.asarray(run('deterministic', params, key, sample_offset=0).tokens)
  second = np.asarray(run('deterministic', params, key, sample_offset=4).tokens)
  reordered = np.asarray(run('deterministic', params, key,
                             sample_indices=np.array([7, 2, 5, 0])).tokens)

  np.testing.assert_array_equal(whole[:4], first)
  np.testing.assert_array_equal(whole[4:], second)
  np.testing.assert_array_equal(whole[[7, 2, 5, 0]], reordered)
  assert len({row.tobytes() for row in whole}) > 1


# ----------------------------------------------------------------------------
# Prompts and infilling.


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_prefix_held_fixed(sampler, biased_params):
  shared = np.array([3, 1, 4])
  per_row = np.array([[1, 2, 3], [4, 4, 4], [2, 2, 1], [3, 3, 3]])
  for prefix in (shared, per_row):
    tokens = np.asarray(run(sampler, biased_params, jax.random.key(8), prefix=prefix).tokens)
    # The model predicts 0 everywhere, so a resampled prompt token would be 0.
    np.testing.assert_array_equal(tokens[:, :3], np.broadcast_to(prefix, (BATCH_SIZE, 3)))
    assert (tokens[:, 3:] == 0).all()


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_infilling_held_fixed(sampler, biased_params):
  rng = np.random.default_rng(0)
  fixed_mask = rng.random((BATCH_SIZE, SEQ_LEN)) < 0.4
  fixed_tokens = rng.integers(1, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN))
  tokens = np.asarray(run(sampler, biased_params, jax.random.key(9),
                          fixed_tokens=fixed_tokens, fixed_mask=fixed_mask).tokens)

  np.testing.assert_array_equal(tokens[fixed_mask], fixed_tokens[fixed_mask])
  assert (tokens[~fixed_mask] == 0).all()


def test_prefix_and_infilling_combined(biased_params):
  fixed_mask = np.zeros(SEQ_LEN, bool)
  fixed_mask[[1, 6]] = True
  fixed_tokens = np.array([0, 2, 0, 0, 0, 0, 3, 0])
  tokens = np.asarray(run('ancestral', biased_params, jax.random.key(10), prefix=[4, 2],
                          fixed_tokens=fixed_tokens, fixed_mask=fixed_mask).tokens)

  np.testing.assert_array_equal(tokens[:, :2], [[4, 2]] * BATCH_SIZE)
  np.testing.assert_array_equal(tokens[:, 6], [3] * BATCH_SIZE)


@pytest.mark.parametrize('overrides, message', [
    (dict(prefix=np.zeros(SEQ_LEN + 1, np.int32)), 'prompt has 9 tokens'),
    (dict(prefix=[1, VOCAB_SIZE]), r'ids outside \[0, 5\)'),
    (dict(prefix=[-1, 2]), r'ids outside \[0, 5\)'),
    (dict(prefix=[1.5, 2.0]), 'integer token ids'),
    (dict(prefix=np.zeros((3, 2), np.int32)), 'shape'),
    (dict(fixed_tokens=np.zeros(SEQ_LEN, np.int32)), 'both fixed_tokens and fixed_mask'),
    (dict(fixed_tokens=np.full(SEQ_LEN, 7), fixed_mask=np.ones(SEQ_LEN, bool)),
     r'ids outside \[0, 5\)'),
    (dict(fixed_tokens=np.zeros(SEQ_LEN, np.int32), fixed_mask=np.ones(SEQ_LEN)), 'boolean'),
    (dict(fixed_tokens=np.zeros(3, np.int32), fixed_mask=np.ones(3, bool)), 'shape'),
    (dict(prefix=[1], fixed_tokens=np.full(SEQ_LEN, 2), fixed_mask=np.ones(SEQ_LEN, bool)),
     'different tokens at positions'),
    (dict(temperature=0.0), 'temperature'),
    (dict(num_steps=0), 'num_steps'),
    (dict(schedule='exponential'), 'Unknown masking schedule'),
    (dict(forbidden=[0, 1, 2, 3, 4]), 'All 5 token ids are forbidden'),
    (dict(mask_id=VOCAB_SIZE + 1), 'one logit per real token'),
])
@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_invalid_inputs_raise(sampler, overrides, message, params):
  with pytest.raises(ValueError, match=message):
    run(sampler, params, jax.random.key(0), **overrides)


def test_sample_indices_shape_checked(params):
  with pytest.raises(ValueError, match='sample_indices'):
    run('deterministic', params, jax.random.key(0), sample_indices=np.arange(3))


def test_forbidden_ids_never_sampled(biased_params):
  # The model prefers 0 by 40 nats; with 0 forbidden the samplers must avoid it.
  for sampler in SAMPLERS:
    tokens = np.asarray(run(sampler, biased_params, jax.random.key(12), forbidden=[0]).tokens)
    assert (tokens != 0).all()
    assert (tokens != VOCAB_SIZE).all()


# ----------------------------------------------------------------------------
# Caching for time-agnostic models, and compilation.


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_cached_logits_same_output(sampler, time_agnostic_params):
  key = jax.random.key(13)
  cached = run(sampler, time_agnostic_params, key, time_conditioned=False)
  uncached = run(sampler, time_agnostic_params, key, time_conditioned=True)
  nfe = np.asarray(cached.nfe)

  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_array_equal(uncached.nfe, [16] * BATCH_SIZE)
  # One pass at the start and one after each step that revealed something,
  # except the last: at most L + 1 = 9 of the 16 steps.
  assert (nfe >= 1).all()
  assert (nfe <= SEQ_LEN + 1).all()
  assert (nfe < 16).all()


def test_cached_nfe_counts_changes(time_agnostic_params):
  # With N = 1024 and L = 8 most positions are revealed at steps of their own,
  # so a sample needs about L passes (fewer when reveals share a step), never
  # more than L + 1.
  output = run('ancestral', time_agnostic_params, jax.random.key(14), num_steps=1024,
               time_conditioned=False)
  nfe = np.asarray(output.nfe)

  assert (nfe <= SEQ_LEN + 1).all()
  assert (nfe >= SEQ_LEN - 2).all()


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_compiles_once_per_shape(sampler, params):
  # batch_size = 3 is used by no other test, so the first call must trace.
  sample_fn = sampling.make_sample_fn(MODEL, sampler=sampler, batch_size=3,
                                      seq_len=SEQ_LEN, num_steps=4, schedule='linear',
                                      mask_id=VOCAB_SIZE)
  other_params = init_params(seed=1)
  extra = {'sample_offset': 3} if sampler == 'deterministic' else {}

  before = MODEL_CALLS['count']
  first = sample_fn(params, jax.random.key(1), prefix=[1, 2], temperature=0.9)
  traced = MODEL_CALLS['count'] - before
  second = sample_fn(other_params, jax.random.key(2), prefix=[3, 4], temperature=1.3,
                     **extra)

  assert traced >= 1
  assert MODEL_CALLS['count'] - before == traced
  assert (np.asarray(first.tokens) != np.asarray(second.tokens)).any()


def test_return_tokens_only(params):
  tokens = run('ancestral', params, jax.random.key(15), return_nfe=False)
  assert tokens.shape == (BATCH_SIZE, SEQ_LEN)


def test_make_sample_fn_unknown_sampler():
  with pytest.raises(ValueError, match='Unknown sampler'):
    sampling.make_sample_fn(MODEL, sampler='greedy')
