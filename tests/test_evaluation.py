"""Tests for mcd_jax.evaluation: Gen PPL, its interval, entropy and the temperature search."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import autoregressive
from mcd_jax import evaluation
from mcd_jax.models import transformer

K = 7
LENGTH = 10


@pytest.fixture(scope='module')
def evaluator():
  model = transformer.Transformer(vocab_size=K, output_size=K, d_model=32, num_layers=1,
                                  num_heads=2, mlp_dim=64, causal=True)
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens, None)['params'])
  return model, params


def test_gen_ppl_pools_nll_over_tokens():
  # Two samples: 10 tokens at 1 nat each and 30 tokens at 3 nats each.
  nll = np.array([10.0, 90.0])
  counts = np.array([10.0, 30.0])

  gen_ppl, _, _ = evaluation.gen_ppl_with_interval(nll, counts)

  assert gen_ppl == pytest.approx(math.exp(100.0 / 40.0))
  # Neither average of per-sample values gives it.
  assert gen_ppl != pytest.approx(math.exp(np.mean(nll / counts)))
  assert gen_ppl != pytest.approx(np.mean(np.exp(nll / counts)))


def test_gen_ppl_independent_of_batching(evaluator):
  model, params = evaluator
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (12, LENGTH), 0, K))

  pooled = evaluation.sample_nll(model, params, tokens, batch_size=12)
  batched = evaluation.sample_nll(model, params, tokens, batch_size=5)
  np.testing.assert_allclose(batched[0], pooled[0], rtol=1e-5)
  np.testing.assert_array_equal(batched[1], pooled[1])

  # The total over every token, against the evaluator's own log-likelihood.
  log_prob, count = autoregressive.sequence_log_likelihood(model, params, jnp.asarray(tokens))
  expected = math.exp(-float(np.sum(np.asarray(log_prob, np.float64))) / float(np.sum(count)))
  assert evaluation.gen_ppl_with_interval(*batched)[0] == pytest.approx(expected, rel=1e-5)

  # Averaging the perplexities of the three batches would give a larger value (Jensen).
  per_batch = [math.exp(batched[0][i:i + 5].sum() / batched[1][i:i + 5].sum())
               for i in range(0, 12, 5)]
  assert np.mean(per_batch) > expected


def test_gen_ppl_interval_coverage():
  # Per-sample NLL per token ~ N(2, 0.5²) over 128 tokens, so the true Gen PPL is e².
  rng = np.random.default_rng(0)
  repeats, samples, tokens = 1000, 64, 128
  counts = np.full(samples, float(tokens))
  covered = 0
  for _ in range(repeats):
    nll = tokens * rng.normal(2.0, 0.5, size=samples)
    _, low, high = evaluation.gen_ppl_with_interval(nll, counts)
    covered += low <= math.exp(2.0) <= high

  # Coverage over 1,000 repeats has a standard error of 0.0069; allow 4 of
  # them plus the t-versus-normal shortfall at 64 samples (about 0.003).
  tolerance = 4 * math.sqrt(0.95 * 0.05 / repeats) + 0.003
  assert abs(covered / repeats - 0.95) < tolerance


def test_interval_undefined_for_one_sample():
  gen_ppl, low, high = evaluation.gen_ppl_with_interval(np.array([20.0]), np.array([10.0]))
  assert gen_ppl == pytest.approx(math.exp(2.0))
  assert math.isnan(low)
  assert math.isnan(high)


def test_unigram_entropy_hand_cases():
  tokens = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 3]])
  np.testing.assert_allclose(evaluation.unigram_entropy(tokens, 5),
                             [0.0, math.log(2), math.log(4)])


def test_measure_quality_counts_and_entropy(evaluator):
  model, params = evaluator
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (6, LENGTH), 0, K))

  quality = evaluation.measure_quality(model, params, tokens, K)

  assert quality.num_samples == 6
  assert quality.num_tokens == 6 * (LENGTH - 1)  # The first token is not predicted.
  assert quality.entropy == pytest.approx(evaluation.unigram_entropy(tokens, K).mean())
  assert quality.gen_ppl_low < quality.gen_ppl < quality.gen_ppl_high


def test_match_temperature_interpolates():
  calls = []

  def entropy_at(temperature):
    calls.append(temperature)
    return 2.0 + 3.0 * temperature  # Linear: interpolation is exact.

  temperature = evaluation.match_temperature(entropy_at, 4.4, low=0.5, high=1.0, iterations=3)

  assert temperature == pytest.approx(0.8)
  assert len(calls) == 2 + 3  # Both ends, then one evaluation per bisection step.


def test_match_temperature_out_of_range():
  def entropy_at(temperature):
    return temperature

  assert evaluation.match_temperature(entropy_at, 2.0, low=0.5) == 1.0
  assert evaluation.match_temperature(entropy_at, 0.1, low=0.5) == 0.5


def test_match_temperature_noisy_estimates():
  # Noisy estimates that are not monotone in T still give a T inside the last bracket.
  values = iter([3.0, 1.0, 2.5, 1.5, 2.9])

  temperature = evaluation.match_temperature(lambda t: next(values), 2.0, iterations=3)

  # Brackets: [0.5, 1] -> [0.5, 0.75] -> [0.625, 0.75] -> [0.625, 0.6875].
  assert temperature == pytest.approx(0.625 + (2.0 - 1.5) / (2.9 - 1.5) * 0.0625)
