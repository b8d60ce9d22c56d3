"""Tests of mcd_jax.categorical: exact Gumbel tails, forbidden ids, temperature.

Statistical checks use fixed seeds. A frequency estimated from n draws is
compared with its exact value p within 4 binomial standard errors,
4 * sqrt(p (1 - p) / n). A correct sampler fails such a check about once in
16,000 seeds.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from mcd_jax import categorical

# Largest Gumbel noise of the usual float32 construction, -log(-log(1 - 2^-23)).
NAIVE_FLOAT32_MAX = -math.log(-math.log1p(-2.0**-23))


def naive_float32_gumbel(high_bits):
  """What not to do: -log(-log U) with U on the 2^-23 grid of one 32-bit word.

  This is the construction of `jax.random.gumbel(..., mode='low')` in jax
  0.10.2: the top 23 bits become the mantissa of a float in [1, 2).
  """
  mantissa = (high_bits >> 9) | np.uint32(0x3F800000)
  u = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
  u = jnp.maximum(u, np.finfo(np.float32).tiny)
  return -jnp.log(-jnp.log(u))


def binomial_bound(p, n):
  return 4.0 * math.sqrt(p * (1.0 - p) / n)


def reference_gumbel(high, low):
  """Float64 Gumbel quantile of the grid point that (high, low) encodes."""
  upper_half = (high >> 31) == 1
  integer = (high & 0x7FFFFFFF) * 2.0**32 + low
  w = (integer + 0.5) * 2.0**-63
  exponential = -math.log1p(-w / 2) if upper_half else -math.log(w / 2)
  return -math.log(exponential)


def test_gumbel_noise_bulk_law():
  n = 200_000
  noise = np.asarray(categorical.gumbel_noise(jax.random.key(0), (n,)), np.float64)

  assert noise.dtype == np.float64
  assert stats.kstest(noise, stats.gumbel_r.cdf).pvalue > 1e-3
  # Mean γ and standard deviation π / √6 of the standard Gumbel law.
  assert abs(noise.mean() - np.euler_gamma) < 4 * (math.pi / math.sqrt(6)) / math.sqrt(n)
  assert abs(noise.std() - math.pi / math.sqrt(6)) < 0.01


def test_gumbel_from_bits_extremes():
  patterns = [
      (0x80000000, 0),  # U just below 1: the largest noise
      (0x80000000, 1),
      (0x80000000, 0xFFFFFFFF),
      (0x80000001, 12345),
      (0x80001000, 0),
      (0xC0000000, 0),
      (0xFFFFFFFF, 0xFFFFFFFF),  # U = 1/2
      (0x7FFFFFFF, 0xFFFFFFFF),
      (0x40000000, 7),
      (0x00000100, 0),
      (0x00000000, 1),
      (0x00000000, 0),  # U just above 0: the smallest noise
  ]
  high = np.array([p[0] for p in patterns], np.uint32)
  low = np.array([p[1] for p in patterns], np.uint32)
  noise = np.asarray(categorical.gumbel_from_bits(jnp.asarray(high), jnp.asarray(low),
                                                  jnp.float32))
  expected = np.array([reference_gumbel(int(h), int(l)) for h, l in patterns])

  np.testing.assert_allclose(noise, expected, rtol=2e-6, atol=2e-6)
  assert noise[0] == pytest.approx(65 * math.log(2), rel=1e-6)
  assert noise[-1] == pytest.approx(-math.log(65 * math.log(2)), rel=1e-6)
  assert noise[0] > 2.5 * NAIVE_FLOAT32_MAX
  # The patterns are listed by decreasing U, so the noise must not increase.
  assert np.all(np.diff(expected) <= 0)
  assert np.all(np.diff(noise) <= 0)


def test_float64_noise_matches_float32():
  bits = jax.random.bits(jax.random.key(1), (2, 10_000), jnp.uint32)
  single = np.asarray(categorical.gumbel_from_bits(bits[0], bits[1], jnp.float32))
  with jax.enable_x64(True):
    assert categorical.noise_dtype() == jnp.float64
    double = np.asarray(categorical.gumbel_noise(jax.random.key(1), (10_000,)))

  assert double.dtype == np.float64
  np.testing.assert_allclose(single, double, rtol=1e-5, atol=1e-5)


def test_upper_tail_beyond_naive_reach():
  # Condition U on (1 - 2^-30, 1): the top 29 of the 63 bits of w are zero.
  # The noise is then above g = -log(-log(1 - 2^-30)) ≈ 20.8, out of reach of
  # the naive float32 noise, and follows P(G > x | G > g) = P(G > x) / 2^-30.
  n = 50_000
  bits = jax.random.bits(jax.random.key(2), (2, n), jnp.uint32)
  high = bits[0] & np.uint32(0x3) | np.uint32(0x80000000)
  noise = np.asarray(categorical.gumbel_from_bits(high, bits[1], jnp.float32), np.float64)

  threshold = -math.log(-math.log1p(-2.0**-30))
  assert NAIVE_FLOAT32_MAX < threshold

  def conditional_cdf(x):
    survival = -np.expm1(-np.exp(-x))
    return np.clip(1.0 - survival / 2.0**-30, 0.0, 1.0)

  assert noise.min() >= threshold - 1e-5
  assert stats.kstest(noise, conditional_cdf).pvalue > 1e-3


def tail_win_counts(key, log_probs, num_rows, chunk_rows, condition_bits=None):
  """Counts rows where a token other than 0 wins, for ours and the naive noise.

  Both samplers read the same random words, so they are coupled.
  `condition_bits(high_ours, high_naive)` may rewrite the first word of each
  method before the noise is built.
  """
  num_classes = log_probs.shape[-1]

  def one_chunk(chunk_key):
    bits = jax.random.bits(chunk_key, (2, chunk_rows, num_classes), jnp.uint32)
    high_ours, high_naive = bits[0], bits[0]
    if condition_bits is not None:
      high_ours, high_naive = condition_bits(high_ours, high_naive)
    ours = categorical.gumbel_argmax(
        log_probs, categorical.gumbel_from_bits(high_ours, bits[1], jnp.float32))
    naive = jnp.argmax(log_probs + naive_float32_gumbel(high_naive), axis=-1)
    return jnp.sum(ours != 0), jnp.sum(naive != 0)

  keys = jax.random.split(key, num_rows // chunk_rows)
  ours, naive = jax.jit(lambda k: jax.lax.map(one_chunk, k))(keys)
  return int(ours.sum()), int(naive.sum())


def conditioned_tail_probability(num_tiny, gap, tail_exponent):
  """P(max_i G_i - gap > G_0) with G_i | U_i > 1 - 2^-m iid and G_0 ~ Gumbel."""
  q = 2.0**-tail_exponent

  def integrand(g0):
    survival = -math.expm1(-math.exp(-(g0 + gap)))
    if survival >= q:
      return 0.0
    all_below = math.exp(num_tiny * math.log1p(-survival / q))
    return math.exp(-g0 - math.exp(-g0)) * all_below

  below, _ = integrate.quad(integrand, -6.0, 30.0, limit=400, epsabs=1e-12)
  return 1.0 - below


def test_heavy_tail_conditioned_on_far_noise():
  # One token at log-probability 0 and K - 1 tokens 20 nats below. A tiny
  # token wins only with noise above ~16, which the naive float32 noise never
  # reaches. Conditioning the tiny tokens' U on the top 2^-17 of (0, 1) makes
  # such noise common, so a few thousand rows measure the tail exactly.
  num_classes, gap, tail_exponent = 5_000, 20.0, 17
  num_rows, chunk_rows = 2_000, 100
  log_probs = np.full(num_classes, -gap, np.float32)
  log_probs[0] = 0.0
  tiny = np.arange(num_classes) > 0

  def condition_bits(high_ours, high_naive):
    ours = (high_ours & np.uint32(0x7FFFFFFF >> (tail_exponent - 1))) | np.uint32(0x80000000)
    naive = high_naive | np.uint32(~(0xFFFFFFFF >> tail_exponent) & 0xFFFFFFFF)
    return jnp.where(tiny, ours, high_ours), jnp.where(tiny, naive, high_naive)

  ours, naive = tail_win_counts(jax.random.key(3), jnp.asarray(log_probs), num_rows,
                                chunk_rows, condition_bits)
  expected = conditioned_tail_probability(num_classes - 1, gap, tail_exponent)
  bound = binomial_bound(expected, num_rows)

  assert 0.2 < expected < 0.8
  assert abs(ours / num_rows - expected) < bound
  assert naive / num_rows < expected - bound


@pytest.mark.skipif(
    os.environ.get('MCD_LONG_TESTS') != '1',
    reason='draws 1e9 noise values (minutes on CPU); set MCD_LONG_TESTS=1')
def test_heavy_tail_unconditioned():
  # K = 50,000: one token at 0 and the rest 17 nats below, a tail mass of
  # about 2e-3. Naive float32 noise keeps about e^-e^(17 - 15.9) ≈ 6% of it.
  num_classes, gap = 50_000, 17.0
  num_rows, chunk_rows = 20_000, 100
  log_probs = np.full(num_classes, -gap)
  log_probs[0] = 0.0
  tail_mass = 1.0 - math.exp(-np.logaddexp.reduce(log_probs))

  ours, naive = tail_win_counts(jax.random.key(4), jnp.asarray(log_probs, jnp.float32),
                                num_rows, chunk_rows)
  bound = binomial_bound(tail_mass, num_rows)

  assert abs(ours / num_rows - tail_mass) < bound
  assert naive / num_rows < tail_mass - bound


@pytest.mark.parametrize('temperature', [1.0, 0.5, 2.0])
def test_sample_categorical_frequencies(temperature):
  n = 100_000
  logits = np.array([2.0, 0.5, 0.0, -1.0, -4.0, -7.0], np.float32)
  draws = jax.jit(
      lambda key, lp, temp: categorical.sample_categorical(key, lp, temperature=temp)
  )(jax.random.key(5), jnp.broadcast_to(jnp.asarray(logits), (n, logits.size)), temperature)
  counts = np.bincount(np.asarray(draws), minlength=logits.size)
  expected = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature))

  assert draws.dtype == jnp.int32
  for k, p in enumerate(expected):
    assert abs(counts[k] / n - p) < binomial_bound(p, n), (k, counts[k] / n, p)


def test_sample_categorical_float64():
  n = 50_000
  logits = np.array([0.0, -2.0, -9.0], np.float64)
  with jax.enable_x64(True):
    draws = np.asarray(categorical.sample_categorical(
        jax.random.key(6), jnp.broadcast_to(jnp.asarray(logits), (n, 3))))
  counts = np.bincount(draws, minlength=3)
  expected = np.exp(logits - np.logaddexp.reduce(logits))

  for k, p in enumerate(expected):
    assert abs(counts[k] / n - p) < binomial_bound(p, n)


def test_sample_categorical_axis():
  log_probs = jnp.log(jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))  # [K = 3, 2]
  draws = categorical.sample_categorical(jax.random.key(7), log_probs, axis=0)
  np.testing.assert_array_equal(draws, [1, 0])


@pytest.mark.parametrize('forbidden', [[0, 3], np.array([True, False, False, True, False])])
def test_forbidden_adversarial_noise(forbidden):
  # Forbidden ids 0 and 3 get the highest log-probability and infinite noise.
  log_probs = jnp.array([[50.0, 0.0, -1.0, 50.0, -2.0]] * 3)
  gumbel = jnp.array([[jnp.inf, 0.0, 0.0, jnp.inf, 0.0],
                      [1e30, -1e30, 0.0, 1e30, 5.0],
                      [jnp.inf, 3.0, 1.0, jnp.inf, -jnp.inf]])
  draws = np.asarray(categorical.gumbel_argmax(log_probs, gumbel, forbidden=forbidden))

  np.testing.assert_array_equal(draws, [1, 4, 1])


def test_forbidden_with_extreme_bits(monkeypatch):
  # Every bit pattern of a constant word gives every id the same noise, so
  # the argmax is decided by the log-probabilities alone: ids 0 and 1 would win.
  log_probs = jnp.array([10.0, 9.0, 0.0, -1.0])
  for word in (0x00000000, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF):
    monkeypatch.setattr(
        jax.random, 'bits',
        lambda key, shape, dtype, w=word: jnp.full(shape, w, dtype))
    draw = int(categorical.sample_categorical(jax.random.key(0), log_probs, forbidden=[0, 1]))
    assert draw == 2, word


def test_forbidden_fallback_is_uniform():
  # Only forbidden id 0 has positive probability: draw uniformly among 1 … 3.
  n = 30_000
  log_probs = jnp.broadcast_to(jnp.array([0.0, -jnp.inf, -jnp.inf, -jnp.inf]), (n, 4))
  draws = np.asarray(categorical.sample_categorical(jax.random.key(8), log_probs,
                                                    forbidden=[0]))
  counts = np.bincount(draws, minlength=4)

  assert counts[0] == 0
  for k in (1, 2, 3):
    assert abs(counts[k] / n - 1 / 3) < binomial_bound(1 / 3, n)


def test_zero_probability_ids_never_drawn():
  log_probs = jnp.array([[-jnp.inf, 0.0, -jnp.inf]] * 4)
  gumbel = jnp.array([[1e30, 0.0, 1e30]] * 4)
  np.testing.assert_array_equal(categorical.gumbel_argmax(log_probs, gumbel), [1] * 4)


def test_forbidden_invalid_values():
  log_probs = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='All 3 token ids are forbidden'):
    categorical.sample_categorical(jax.random.key(0), log_probs, forbidden=[0, 1, 2])
  with pytest.raises(ValueError, match=r'outside|must lie in \[0, 3\)'):
    categorical.sample_categorical(jax.random.key(0), log_probs, forbidden=[3])
  with pytest.raises(ValueError, match='shape'):
    categorical.sample_categorical(jax.random.key(0), log_probs, forbidden=np.zeros(4, bool))
  with pytest.raises(ValueError, match='traced'):
    jax.jit(lambda f: categorical.sample_categorical(jax.random.key(0), log_probs,
                                                     forbidden=f))(jnp.array([0]))
  with pytest.raises(ValueError, match='temperature'):
    categorical.gumbel_argmax(log_probs, log_probs, temperature=0.0)


def test_uniform_is_fine_near_zero():
  # Zeroing the half bit and the top 30 bits of w puts U in (0, 2^-31). A
  # float32 uniform on the usual 2^-23 grid has no values there but 0, while
  # this one is still uniform on that interval.
  n = 20_000
  bits = jax.random.bits(jax.random.key(9), (2, n), jnp.uint32)
  high = bits[0] & np.uint32(0x1)
  draws = np.asarray(categorical.uniform_from_bits(high, bits[1], jnp.float32), np.float64)

  assert draws.min() > 0.0
  assert draws.max() < 2.0**-31
  assert stats.kstest(draws / 2.0**-31, 'uniform').pvalue > 1e-3
