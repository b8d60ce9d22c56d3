"""Tests for mcd_jax.duality: A_K, its inverse, projection, gaps, trajectories.

Statistical tests use fixed seeds. A Monte Carlo frequency p̂ over n draws is
compared with p within 4 binomial standard errors 4·√(p(1-p)/n), and KS tests
require p-value > 0.01, so a correct implementation would fail about 1 time
in 100 per KS test with a random seed. The fixed seeds repeat the same draws.
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import optimize
from scipy import special
from scipy import stats

from mcd_jax import duality
from mcd_jax import schedules


def reference_keep_probability(gamma, vocab_size):
  """A_K(γ) = ∫ φ(u) Φ(u + γ)^{K-1} du by adaptive quadrature in float64."""

  def integrand(u):
    log_cdf = special.log_ndtr(u + gamma)
    return stats.norm.pdf(u) * math.exp((vocab_size - 1) * log_cdf)

  value, _ = integrate.quad(
      integrand, -14.0, 14.0, epsabs=1e-14, epsrel=1e-12, limit=500)
  return value


def reference_keep_probability_from_max(gamma, vocab_size):
  """A_K(γ) = E[Φ(γ - M)] = ∫_0^1 Φ(γ - Φ^{-1}(y^{1/(K-1)})) dy, a second formula."""

  def integrand(y):
    log_p = math.log(y) / (vocab_size - 1)
    p = math.exp(log_p)
    if p < 0.5:
      other_max = special.ndtri(p)
    else:
      other_max = -special.ndtri(-math.expm1(log_p))
    return special.ndtr(gamma - other_max)

  value, _ = integrate.quad(integrand, 0.0, 1.0, epsabs=1e-14, epsrel=1e-12,
                            limit=500)
  return value


def monte_carlo_tolerance(p, n):
  return 4.0 * math.sqrt(p * (1.0 - p) / n)


# ---------------------------------------------------------------------------
# Claim A: P(z_t = x) = A_K(γ_t).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('vocab_size', [2, 50, 1000])
def test_keep_probability_matches_monte_carlo(vocab_size):
  # n · K normals stay at 2e7 at most, so K = 1000 gets n = 20,000.
  n = min(200_000, 20_000_000 // vocab_size)
  noise = jax.random.normal(jax.random.key(vocab_size), (n, vocab_size))
  tokens = jax.random.randint(jax.random.key(1), (n,), 0, vocab_size)
  gammas = np.linspace(-2.0, 4.0, 7)

  @jax.jit
  def kept_fraction(gamma):
    latent = duality.gaussian_latent(noise, tokens, gamma)
    z = duality.project(latent, tokens, vocab_size)
    return jnp.mean((z == tokens).astype(jnp.float32))

  for gamma in gammas:
    frequency = float(kept_fraction(gamma))
    expected = reference_keep_probability(gamma, vocab_size)
    implemented = float(duality.keep_probability(gamma, vocab_size))
    tolerance = monte_carlo_tolerance(expected, n)
    assert abs(frequency - implemented) <= tolerance, (gamma, frequency,
                                                       implemented, tolerance)


@pytest.mark.parametrize('vocab_size', [2, 3, 50, 1000, 50257, 262144])
def test_keep_probability_at_zero_is_one_over_k(vocab_size):
  value = float(duality.keep_probability(0.0, vocab_size))
  assert abs(value - 1.0 / vocab_size) < 1e-6


@pytest.mark.parametrize('vocab_size', [2, 7, 50, 1000, 50257, 262144])
def test_keep_probability_matches_reference(vocab_size):
  rng = np.random.default_rng(vocab_size)
  gammas = np.concatenate([rng.uniform(-4.0, 10.0, 24), [-8.0, 0.0, 12.0]])
  reference = np.array(
      [reference_keep_probability(g, vocab_size) for g in gammas])
  second_reference = np.array(
      [reference_keep_probability_from_max(g, vocab_size) for g in gammas])

  # The two quadratures use different formulas, so they check each other.
  assert np.max(np.abs(reference - second_reference)) < 1e-9

  gamma_grid, alpha_table = duality.keep_probability_table(vocab_size)
  float64_error = np.abs(np.interp(gammas, gamma_grid, alpha_table) - reference)
  assert np.max(float64_error) < 1e-7

  implemented = np.asarray(
      duality.keep_probability(jnp.asarray(gammas, jnp.float32), vocab_size))
  assert implemented.dtype == np.float32
  assert np.max(np.abs(implemented - reference)) < 1e-6


@pytest.mark.parametrize('vocab_size', [2, 50, 1000, 262144])
def test_keep_probability_strictly_increasing(vocab_size):
  gammas = jnp.linspace(-2.0, 4.0, 601)
  values = np.asarray(duality.keep_probability(gammas, vocab_size))
  assert np.all(np.diff(values) > 0)

  _, alpha_table = duality.keep_probability_table(vocab_size)
  inside = (alpha_table > 1e-12) & (alpha_table < 1.0 - 1e-12)
  assert np.all(np.diff(alpha_table[inside]) > 0)
  assert np.all(np.diff(alpha_table) >= 0)


@pytest.mark.parametrize('vocab_size', [2, 1000, 262144])
def test_keep_probability_finite_at_ends(vocab_size):
  gammas = jnp.array([-jnp.inf, -1e30, 1e30, jnp.inf])
  values = np.asarray(duality.keep_probability(gammas, vocab_size))
  assert np.all(np.isfinite(values))
  np.testing.assert_allclose(values, [0.0, 0.0, 1.0, 1.0], atol=1e-6)

  assert np.isnan(float(duality.keep_probability(jnp.nan, vocab_size)))


@pytest.mark.parametrize('vocab_size', [2, 50, 1000, 262144])
def test_gamma_from_alpha_round_trip(vocab_size):
  alphas = jnp.linspace(0.0, 1.0, 10_001)
  gammas = duality.gamma_from_alpha(alphas, vocab_size)
  round_trip = duality.keep_probability(gammas, vocab_size)
  assert float(jnp.max(jnp.abs(round_trip - alphas))) < 1e-6
  assert bool(jnp.all(jnp.diff(gammas) >= 0))

  # γ → α → γ where α is far enough from 0 and 1 for float32 to resolve γ.
  gammas = np.linspace(-2.0, 4.0, 61)
  alphas = np.asarray(duality.keep_probability(gammas, vocab_size))
  resolvable = (alphas > 1e-4) & (alphas < 1.0 - 1e-4)
  recovered = np.asarray(duality.gamma_from_alpha(alphas, vocab_size))
  assert np.max(np.abs(recovered - gammas)[resolvable]) < 1e-3


@pytest.mark.parametrize('vocab_size', [2, 1000, 262144])
def test_gamma_from_alpha_finite_at_ends(vocab_size):
  alphas = jnp.array([-0.5, 0.0, 1.0, 1.5])
  gammas = np.asarray(duality.gamma_from_alpha(alphas, vocab_size))
  assert np.all(np.isfinite(gammas))
  assert np.all(np.diff(gammas) >= 0)

  kept = np.asarray(duality.keep_probability(gammas, vocab_size))
  np.testing.assert_allclose(kept, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_vocab_size_is_validated():
  with pytest.raises(ValueError, match='vocab_size'):
    duality.keep_probability(0.0, 1)

  traced = jax.jit(duality.keep_probability)
  with pytest.raises(TypeError, match='static'):
    traced(0.0, 50)


def test_import_creates_no_backend():
  code = ('import mcd_jax.duality\n'
          'from jax._src import xla_bridge\n'
          'assert not xla_bridge.backends_are_initialized()\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Projection and Claim B: with ε fixed, the masked set only grows with t.
# ---------------------------------------------------------------------------


def test_project_keeps_only_strict_maximum():
  latent = jnp.array([[3.0, 1.0, 2.0],
                      [3.0, 1.0, 2.0],
                      [2.0, 2.0, 0.0]])
  tokens = jnp.array([0, 2, 0])
  z = np.asarray(duality.project(latent, tokens, mask_id=3))
  np.testing.assert_array_equal(z, [0, 3, 3])


def test_gaussian_latent_accepts_infinite_gamma():
  noise = jax.random.normal(jax.random.key(0), (4, 50))
  tokens = jnp.array([0, 7, 13, 49])
  for gamma, expected in [(jnp.inf, tokens), (-jnp.inf, jnp.full(4, 50))]:
    latent = duality.gaussian_latent(noise, tokens, gamma)
    z = duality.project(latent, tokens, mask_id=50)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(expected))


def test_full_latent_keeps_token_iff_gamma_above_gap():
  vocab_size = 50
  noise = jax.random.normal(jax.random.key(3), (4, 64, vocab_size))
  tokens = jax.random.randint(jax.random.key(4), (4, 64), 0, vocab_size)
  gap = duality.masking_gap_from_noise(noise, tokens)

  @jax.jit
  def count_mismatches(gamma):
    latent = duality.gaussian_latent(noise, tokens, gamma)
    kept = duality.project(latent, tokens, vocab_size) == tokens
    return jnp.sum(kept != (gamma > gap))

  mismatches = sum(int(count_mismatches(g)) for g in np.linspace(-3, 6, 37))

  # γ + ε_x versus max ε_j and γ versus g can differ only by float32 rounding.
  assert mismatches <= 2


def assert_nested(masks):
  """Asserts masked(t_i) ⊆ masked(t_{i+1}) for masks ordered by time."""
  for earlier, later in zip(masks[:-1], masks[1:]):
    assert not np.any(earlier & ~later)


@pytest.mark.parametrize('schedule_name', ['linear', 'cosine'])
def test_full_latent_masks_are_nested(schedule_name):
  vocab_size = 50
  schedule = schedules.get_schedule(schedule_name)
  noise = jax.random.normal(jax.random.key(5), (4, 64, vocab_size))
  tokens = jax.random.randint(jax.random.key(6), (4, 64), 0, vocab_size)
  times = np.linspace(0.0, 1.0, 41)

  @jax.jit
  def masked_at(t):
    gamma = duality.gamma_from_alpha(schedule.alpha(t), vocab_size)
    latent = duality.gaussian_latent(noise, tokens, gamma)
    return duality.project(latent, tokens, vocab_size) == vocab_size

  masks = [np.asarray(masked_at(t)) for t in times]

  assert_nested(masks)
  assert not masks[0].any()
  assert masks[-1].all()
  assert 0.2 < masks[len(times) // 2].mean() < 0.8


@pytest.mark.parametrize('schedule_name', ['linear', 'cosine', 'loglinear'])
def test_reduced_masks_are_nested(schedule_name):
  vocab_size = 50257
  schedule = schedules.get_schedule(schedule_name)
  tokens = jax.random.randint(jax.random.key(7), (8, 256), 0, vocab_size)
  times_of_masking = duality.masking_times(
      jax.random.key(8), tokens.shape, schedule, vocab_size)
  times = np.linspace(0.0, 1.0, 41)

  masked_at = jax.jit(
      lambda t: duality.mask_at(tokens, times_of_masking, t, vocab_size)
      == vocab_size)
  masks = [np.asarray(masked_at(t)) for t in times]

  assert_nested(masks)
  assert not masks[0].any()
  assert masks[-1].all()
  assert 0.2 < masks[len(times) // 2].mean() < 0.8


def test_mask_at_uses_one_time_per_row():
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  times_of_masking = jnp.array([[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]])
  z = duality.mask_at(tokens, times_of_masking, jnp.array([0.5, 0.05]), 9)
  np.testing.assert_array_equal(np.asarray(z), [[9, 9, 3], [4, 5, 6]])


def test_coupled_pair_reveals_superset():
  vocab_size = 1000
  schedule = schedules.cosine()
  tokens = jax.random.randint(jax.random.key(9), (16, 128), 0, vocab_size)
  times_of_masking = duality.masking_times(
      jax.random.key(10), tokens.shape, schedule, vocab_size)
  t = jax.random.uniform(jax.random.key(11), (16,), minval=0.1, maxval=1.0)
  s = t - 0.1

  z_t, z_s = duality.coupled_pair(tokens, times_of_masking, t, s, vocab_size)

  revealed_t = np.asarray(z_t != vocab_size)
  revealed_s = np.asarray(z_s != vocab_size)
  assert not np.any(revealed_t & ~revealed_s)
  assert np.any(revealed_s & ~revealed_t)
  np.testing.assert_array_equal(np.asarray(z_s)[revealed_s],
                                np.asarray(tokens)[revealed_s])
  np.testing.assert_array_equal(
      np.asarray(z_t),
      np.asarray(duality.mask_at(tokens, times_of_masking, t, vocab_size)))


# ---------------------------------------------------------------------------
# Claim C: the reduced sampler has the law of the full-latent gap.
# ---------------------------------------------------------------------------


def full_latent_gap(rng, n, vocab_size):
  noise_rng, token_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, (n, vocab_size))
  tokens = jax.random.randint(token_rng, (n,), 0, vocab_size)
  return np.asarray(duality.masking_gap_from_noise(noise, tokens))


def test_reduced_gap_matches_full_latent():
  n, vocab_size = 100_000, 50
  full = full_latent_gap(jax.random.key(12), n, vocab_size)
  reduced = np.asarray(
      duality.sample_masking_gap(jax.random.key(13), (n,), vocab_size))
  assert stats.ks_2samp(full, reduced).pvalue > 0.01


def test_gap_ks_detects_wrong_vocab_size():
  # The same KS test must reject a sampler for K = 40 against the K = 50 law,
  # or passing the test above would mean nothing.
  n = 100_000
  full = full_latent_gap(jax.random.key(12), n, 50)
  reduced = np.asarray(duality.sample_masking_gap(jax.random.key(13), (n,), 40))
  assert stats.ks_2samp(full, reduced).pvalue < 0.01


@pytest.mark.parametrize('vocab_size', [2, 50, 262144])
def test_masking_uniform_is_uniform(vocab_size):
  gap = duality.sample_masking_gap(jax.random.key(14), (100_000,), vocab_size)
  uniform = np.asarray(duality.masking_uniform(gap, vocab_size))
  assert stats.kstest(uniform, 'uniform').pvalue > 0.01


def test_masking_times_follow_schedule_law():
  n, vocab_size = 100_000, 1000
  rng = jax.random.key(15)

  linear_times = duality.masking_times(rng, (n,), schedules.linear(), vocab_size)
  assert stats.kstest(np.asarray(linear_times), 'uniform').pvalue > 0.01

  # Under cosine, P(τ <= t) = P(U >= cos(πt/2)) = 1 - cos(πt/2).
  cosine_times = duality.masking_times(rng, (n,), schedules.cosine(), vocab_size)
  cosine_cdf = lambda t: 1.0 - np.cos(0.5 * np.pi * np.clip(t, 0.0, 1.0))
  assert stats.kstest(np.asarray(cosine_times), cosine_cdf).pvalue > 0.01

  # Under log-linear, τ has an atom of mass ε_min at τ = 1 (draws U < ε_min).
  eps_min = 0.05
  loglinear_times = np.asarray(duality.masking_times(
      rng, (n,), schedules.loglinear(eps_min), vocab_size))
  atom = np.mean(loglinear_times == 1.0)
  assert abs(atom - eps_min) <= monte_carlo_tolerance(eps_min, n)


def test_large_vocab_gap_float32_stable():
  n, vocab_size = 100_000, 262144
  gap = duality.sample_masking_gap(jax.random.key(16), (n,), vocab_size)
  assert gap.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(gap)))
  gap = np.asarray(gap)

  # Quantiles of g solve A_K(q) = p, with A_K from the float64 reference.
  for p in [1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999]:
    quantile = optimize.brentq(
        lambda g, p=p: reference_keep_probability(g, vocab_size) - p,
        -5.0, 15.0, xtol=1e-10)
    frequency = np.mean(gap < quantile)
    assert abs(frequency - p) <= monte_carlo_tolerance(p, n), (p, frequency)


@pytest.mark.parametrize('num_normals', [2, 49, 262143, 10**9])
def test_max_of_normals_extreme_uniforms(num_normals):
  uniforms = np.array([np.finfo(np.float32).tiny, 2.0**-23, 0.3, 0.5,
                       1.0 - 2.0**-23, 1.0 - 2.0**-24], np.float32)
  values = np.asarray(duality._max_of_normals(jnp.asarray(uniforms),
                                              num_normals))
  assert np.all(np.isfinite(values))
  assert np.all(np.diff(values) > 0)

  # Float64 reference: M = Φ^{-1}(U^{1/n}), with 1 - p from expm1 near p = 1.
  log_p = np.log(uniforms.astype(np.float64)) / num_normals
  reference = np.where(np.exp(log_p) < 0.5, special.ndtri(np.exp(log_p)),
                       -special.ndtri(-np.expm1(log_p)))
  np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# jit and vmap give the values of the plain call.
# ---------------------------------------------------------------------------


def test_jit_matches_plain_call():
  vocab_size = 1000
  schedule = schedules.cosine()
  gammas = jnp.linspace(-3.0, 8.0, 101)
  alphas = jnp.linspace(0.0, 1.0, 101)

  # XLA may fuse a multiply-add under jit, so values agree to float32 rounding.
  jit_keep = jax.jit(duality.keep_probability, static_argnames='vocab_size')
  np.testing.assert_allclose(
      jit_keep(gammas, vocab_size=vocab_size),
      duality.keep_probability(gammas, vocab_size), rtol=1e-6, atol=0)

  jit_inverse = jax.jit(duality.gamma_from_alpha, static_argnames='vocab_size')
  np.testing.assert_allclose(
      jit_inverse(alphas, vocab_size=vocab_size),
      duality.gamma_from_alpha(alphas, vocab_size), rtol=1e-6, atol=1e-6)

  jit_gap = jax.jit(duality.sample_masking_gap, static_argnums=(1, 2))
  rng = jax.random.key(17)
  np.testing.assert_allclose(
      jit_gap(rng, (4, 32), vocab_size),
      duality.sample_masking_gap(rng, (4, 32), vocab_size), rtol=1e-6)

  jit_times = jax.jit(duality.masking_times, static_argnums=(1, 2, 3))
  times_of_masking = duality.masking_times(rng, (4, 32), schedule, vocab_size)
  np.testing.assert_allclose(jit_times(rng, (4, 32), schedule, vocab_size),
                             times_of_masking, rtol=1e-6, atol=1e-7)

  tokens = jax.random.randint(jax.random.key(18), (4, 32), 0, vocab_size)
  t, s = jnp.array([0.2, 0.4, 0.6, 0.8]), jnp.array([0.1, 0.3, 0.5, 0.7])
  jit_pair = jax.jit(duality.coupled_pair, static_argnames='mask_id')
  for jitted, plain in zip(
      jit_pair(tokens, times_of_masking, t, s, mask_id=vocab_size),
      duality.coupled_pair(tokens, times_of_masking, t, s, vocab_size)):
    np.testing.assert_array_equal(jitted, plain)

  latent = jax.random.normal(rng, (4, 32, vocab_size))
  jit_project = jax.jit(duality.project, static_argnames='mask_id')
  np.testing.assert_array_equal(
      jit_project(latent, tokens, mask_id=vocab_size),
      duality.project(latent, tokens, vocab_size))


def test_vmap_matches_plain_call():
  vocab_size = 50
  schedule = schedules.linear()
  gammas = jnp.linspace(-3.0, 6.0, 40).reshape(4, 10)
  np.testing.assert_allclose(
      jax.vmap(lambda g: duality.keep_probability(g, vocab_size))(gammas),
      duality.keep_probability(gammas, vocab_size), rtol=1e-6, atol=0)

  keys = jax.random.split(jax.random.key(19), 3)
  batched = jax.vmap(
      lambda k: duality.masking_times(k, (8,), schedule, vocab_size))(keys)
  one_by_one = jnp.stack(
      [duality.masking_times(k, (8,), schedule, vocab_size) for k in keys])
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)

  latent = jax.random.normal(keys[0], (3, 16, vocab_size))
  tokens = jax.random.randint(keys[1], (3, 16), 0, vocab_size)
  np.testing.assert_array_equal(
      jax.vmap(lambda w, x: duality.project(w, x, vocab_size))(latent, tokens),
      duality.project(latent, tokens, vocab_size))
