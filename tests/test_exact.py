"""Tests for the exact sampler distributions on tiny sources."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from mcd_jax import exact
from mcd_jax import schedules

LINEAR = schedules.linear()


def _brute_force_sampler(source, seq_len, vocab_size, num_steps):
  """The ancestral sampler with the exact posterior, by enumerating every reveal and symbol."""
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  powers = (vocab_size + 1) ** np.arange(seq_len - 1, -1, -1)
  result = np.zeros(vocab_size ** seq_len)

  def walk(state, step, probability):
    masked = [i for i in range(seq_len) if state[i] == vocab_size]
    if not masked:
      result[int(np.dot(state, vocab_size ** np.arange(seq_len - 1, -1, -1)))] += probability
      return
    t, s = 1.0 - step / num_steps, 1.0 - (step + 1) / num_steps
    reveal = 1.0 if step == num_steps - 1 else ((1 - s) - (1 - t)) / (1 - (1 - t))
    row = table[int(np.dot(state, powers))]
    for chosen in itertools.product([False, True], repeat=len(masked)):
      revealed = [i for i, c in zip(masked, chosen) if c]
      weight = reveal ** len(revealed) * (1 - reveal) ** (len(masked) - len(revealed))
      if weight == 0:
        continue
      for symbols in itertools.product(range(vocab_size), repeat=len(revealed)):
        new_state = list(state)
        symbol_probability = 1.0
        for i, k in zip(revealed, symbols):
          new_state[i] = k
          symbol_probability *= row[i, k]
        walk(new_state, step + 1, probability * weight * symbol_probability)

  walk([vocab_size] * seq_len, 0, 1.0)
  return result


# ---- Sources and the posterior ----


@pytest.mark.parametrize('maker', [exact.markov_source, exact.mixture_source])
def test_sources_are_distributions(maker):
  source = maker(4, 3, seed=1)
  assert source.shape == (81,)
  assert np.all(source > 0)
  np.testing.assert_allclose(source.sum(), 1.0, rtol=1e-12)
  np.testing.assert_array_equal(source, maker(4, 3, seed=1))
  assert not np.allclose(source, maker(4, 3, seed=2))


def test_posterior_matches_enumeration():
  seq_len, vocab_size = 4, 3
  source = exact.markov_source(seq_len, vocab_size, seed=0)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  states = exact.all_partial_states(seq_len, vocab_size)
  sequences = exact.all_sequences(seq_len, vocab_size)
  np.testing.assert_allclose(table.sum(axis=-1), 1.0, rtol=1e-12)

  for index in (0, 7, 40, 100, len(states) - 1):
    state = states[index]
    observed = state < vocab_size
    consistent = np.all(sequences[:, observed] == state[observed], axis=1)
    weights = source * consistent
    for i in range(seq_len):
      expected = np.bincount(sequences[:, i], weights=weights, minlength=vocab_size)
      np.testing.assert_allclose(table[index, i], expected / expected.sum(), rtol=1e-10)


# ---- The ancestral sampler ----


@pytest.mark.parametrize('num_steps', [2, 3])
def test_sampler_matches_brute_force(num_steps):
  seq_len, vocab_size = 3, 2
  source = exact.mixture_source(seq_len, vocab_size, seed=4)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  dynamic = exact.sampler_distribution(table, num_steps, LINEAR, seq_len, vocab_size)
  np.testing.assert_allclose(dynamic, _brute_force_sampler(source, seq_len, vocab_size,
                                                           num_steps), rtol=1e-10)


def test_one_step_sampler_is_product_of_marginals():
  seq_len, vocab_size = 5, 3
  source = exact.markov_source(seq_len, vocab_size, seed=2)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  one_step = exact.sampler_distribution(table, 1, LINEAR, seq_len, vocab_size)
  product = exact.product_of_marginals(source, seq_len, vocab_size)
  np.testing.assert_allclose(one_step, product, rtol=1e-10)
  np.testing.assert_allclose(exact.kl_divergence(one_step, source),
                             exact.kl_divergence(product, source), rtol=1e-10)
  assert exact.kl_divergence(one_step, source) > 0.05  # The source has real dependencies.


@pytest.mark.parametrize('maker', [exact.markov_source, exact.mixture_source])
def test_sampler_kl_decreases_with_steps(maker):
  seq_len, vocab_size = 5, 3
  source = maker(seq_len, vocab_size, seed=3)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  kls = []
  for num_steps in (1, 2, 4, 8, 16, 32):
    distribution = exact.sampler_distribution(table, num_steps, LINEAR, seq_len, vocab_size)
    np.testing.assert_allclose(distribution.sum(), 1.0, rtol=1e-12)
    kls.append(exact.kl_divergence(distribution, source))
  assert all(later < earlier for earlier, later in zip(kls, kls[1:])), kls


def test_many_step_sampler_recovers_source():
  """With N steps and the linear schedule, each position's reveal step is uniform on
  the N steps. When no two positions share a step the sampler follows the chain
  rule and is exact, so the sampler is (1 - c)·source + c·other, where c is the
  chance of a shared step. Hence TV <= c and KL <= c · max_x(-log p(x))."""
  seq_len, vocab_size, num_steps = 4, 3, 1024
  source = exact.mixture_source(seq_len, vocab_size, seed=5)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  distribution = exact.sampler_distribution(table, num_steps, LINEAR, seq_len, vocab_size)
  collision = 1.0 - np.prod(1.0 - np.arange(seq_len) / num_steps)

  total_variation = 0.5 * np.abs(distribution - source).sum()
  kl = exact.kl_divergence(distribution, source)
  assert total_variation <= collision
  assert kl <= collision * np.max(-np.log(source))
  assert kl < 1e-3 * exact.kl_divergence(
      exact.product_of_marginals(source, seq_len, vocab_size), source)


def test_time_dependent_denoiser_is_called_per_step():
  seq_len, vocab_size = 3, 2
  source = exact.markov_source(seq_len, vocab_size, seed=6)
  table = exact.posterior_denoiser(source, seq_len, vocab_size)
  calls = []

  def denoiser(t):
    calls.append(t)
    return table

  distribution = exact.sampler_distribution(denoiser, 4, LINEAR, seq_len, vocab_size)
  assert calls == [1.0, 0.75, 0.5, 0.25]
  np.testing.assert_allclose(
      distribution, exact.sampler_distribution(table, 4, LINEAR, seq_len, vocab_size),
      rtol=1e-12)


def test_kl_and_entropy():
  p = np.array([0.5, 0.5, 0.0])
  q = np.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(exact.kl_divergence(p, q), np.log(2.0), rtol=1e-12)
  assert exact.kl_divergence(q, p) == float('inf')
  np.testing.assert_allclose(exact.entropy(p), np.log(2.0), rtol=1e-12)


# ---- The exact MCD optimum ----


def test_mcd_optimum_without_reveals_is_teacher():
  """With Δ = 0, z_s = z_t, so the geometric mean of the teacher over z_s is the teacher."""
  seq_len, vocab_size = 4, 3
  source = exact.mixture_source(seq_len, vocab_size, seed=7)
  posterior = exact.posterior_denoiser(source, seq_len, vocab_size)
  optimum = exact.mcd_optimal_denoiser(source, seq_len, vocab_size, 0.7, 0.0, LINEAR)
  np.testing.assert_allclose(optimum, posterior, atol=1e-9)


def test_mcd_optimum_solver_matches_generic_minimiser():
  rng = np.random.default_rng(0)
  vocab_size, reveal = 4, 0.3
  posterior = rng.dirichlet(np.ones(vocab_size), size=5)
  expected_log_probs = np.log(rng.dirichlet(np.ones(vocab_size), size=5))
  solved = exact._minimise_ce_plus_reverse_kl(posterior, expected_log_probs, reveal)

  for row in range(5):

    def objective(logits):
      log_p = logits - scipy.special.logsumexp(logits)
      p = np.exp(log_p)
      return (-reveal * np.sum(posterior[row] * log_p)
              + (1 - reveal) * np.sum(p * (log_p - expected_log_probs[row])))

    generic = scipy.optimize.minimize(objective, np.zeros(vocab_size), method='BFGS',
                                      options={'gtol': 1e-10})
    np.testing.assert_allclose(solved[row], scipy.special.softmax(generic.x), atol=1e-5)


@pytest.mark.parametrize('maker', [exact.markov_source, exact.mixture_source])
def test_mcd_optimum_beats_teacher_at_two_steps(maker):
  """The toy study: L = 6, V = 4, exact posterior teacher, student step 2Δ = 1/2."""
  seq_len, vocab_size, num_steps = 6, 4, 2
  delta = 0.5 / num_steps
  source = maker(seq_len, vocab_size, seed=0)
  teacher = exact.posterior_denoiser(source, seq_len, vocab_size)
  tables = {t: exact.mcd_optimal_denoiser(source, seq_len, vocab_size, t, delta, LINEAR,
                                          teacher_table=teacher)
            for t in (1.0, 0.5)}

  student_kl = exact.kl_divergence(exact.sampler_distribution(
      lambda t: tables[t], num_steps, LINEAR, seq_len, vocab_size), source)
  teacher_kl = exact.kl_divergence(exact.sampler_distribution(
      teacher, num_steps, LINEAR, seq_len, vocab_size), source)
  assert student_kl < 0.9 * teacher_kl, (student_kl, teacher_kl)


# ---- A JAX model's table ----


class PositionModel(nn.Module):
  """Logits that depend on the position, the token and t, to check the table layout."""
  vocab_size: int

  @nn.compact
  def __call__(self, tokens, t, padding_mask=None, deterministic=True):
    del padding_mask, deterministic
    position = jnp.arange(tokens.shape[1], dtype=jnp.float32)[None, :, None]
    token = tokens.astype(jnp.float32)[..., None]
    symbols = jnp.arange(self.vocab_size, dtype=jnp.float32)
    return position * symbols + 0.1 * token * symbols + t[:, None, None] * symbols ** 2


def test_model_denoiser_table_layout():
  seq_len, vocab_size, t = 3, 2, 0.5
  model = PositionModel(vocab_size)
  states = exact.all_partial_states(seq_len, vocab_size)
  # 27 states in batches of 10 exercise the padded last batch.
  table = exact.model_denoiser_table(model, {}, seq_len, vocab_size, t=t, batch_size=10)
  assert table.shape == (27, seq_len, vocab_size)

  symbols = np.arange(vocab_size)
  for index, state in enumerate(states):
    for i in range(seq_len):
      if state[i] < vocab_size:
        np.testing.assert_array_equal(table[index, i], np.eye(vocab_size)[state[i]])
      else:
        logits = i * symbols + 0.1 * vocab_size * symbols + t * symbols ** 2
        np.testing.assert_allclose(table[index, i], scipy.special.softmax(logits), rtol=1e-5)


def test_entropy_matched_sampler_recovers_temperature():
  seq_len, vocab_size = 3, 3
  schedule = schedules.get_schedule('linear')
  source = exact.mixture_source(seq_len, vocab_size, seed=1)
  teacher = exact.posterior_denoiser(source, seq_len, vocab_size)
  target = exact.entropy(exact.sampler_distribution(
      exact.tempered_table(teacher, 0.8), 2, schedule, seq_len, vocab_size))

  temperature, distribution = exact.entropy_matched_sampler(
      teacher, target, 2, schedule, seq_len, vocab_size)

  assert abs(temperature - 0.8) < 1e-4
  assert abs(exact.entropy(distribution) - target) < 1e-6
