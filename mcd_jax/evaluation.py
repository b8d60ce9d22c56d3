"""Sample quality and speed: Gen PPL, unigram entropy, NFE and wall-clock.

Gen PPL is the perplexity of generated samples under an autoregressive
evaluator trained on the same corpus and tokenizer. The negative
log-likelihood is summed over every generated token of every sample and
divided once by the token count before exponentiating. Per-batch perplexities
are never averaged.
"""

import dataclasses
import functools
import math
import time

import jax
import numpy as np

from mcd_jax import autoregressive

# Two-sided 95% normal quantile.
Z_95 = 1.959963984540054


@dataclasses.dataclass
class SampleQuality:
  """Quality of one set of samples."""

  gen_ppl: float
  gen_ppl_low: float  # 95% interval, from the sample-level spread of the NLL.
  gen_ppl_high: float
  entropy: float  # Mean per-sample unigram entropy, in nats.
  entropy_stderr: float
  num_samples: int
  num_tokens: int


@functools.partial(jax.jit, static_argnames=('model',))
def _log_likelihood(model, params, tokens):
  return autoregressive.sequence_log_likelihood(model, params, tokens)


def sample_nll(evaluator_model, evaluator_params, tokens: np.ndarray, batch_size: int = 64
              ) -> tuple[np.ndarray, np.ndarray]:
  """Computes the summed NLL (nats) and predicted-token count of each sample, float64[N] each."""
  nll, counts = [], []
  for start in range(0, len(tokens), batch_size):
    log_prob, count = _log_likelihood(evaluator_model, evaluator_params,
                                      np.asarray(tokens[start:start + batch_size]))
    nll.append(-np.asarray(log_prob, np.float64))
    counts.append(np.asarray(count, np.float64))
  return np.concatenate(nll), np.concatenate(counts)


def gen_ppl_with_interval(nll: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
  """Gen PPL = exp(Σ NLL / Σ tokens) with a 95% interval.

  The interval treats samples as the independent units and uses the delta
  method for the ratio Σ NLL / Σ tokens, then maps its ends through exp.
  """
  total_tokens = counts.sum()
  mean = nll.sum() / total_tokens
  n = len(nll)
  if n < 2:
    return math.exp(mean), float('nan'), float('nan')
  residuals = nll - mean * counts
  stderr = math.sqrt(np.sum(residuals ** 2) / (n - 1) / n) / (total_tokens / n)
  return math.exp(mean), math.exp(mean - Z_95 * stderr), math.exp(mean + Z_95 * stderr)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """Computes the entropy (nats) of each sample's empirical token distribution, float64[N]."""
  entropies = np.empty(len(tokens))
  for index, row in enumerate(np.asarray(tokens)):
    counts = np.bincount(row, minlength=vocab_size).astype(np.float64)
    probabilities = counts[counts > 0] / counts.sum()
    entropies[index] = -np.sum(probabilities * np.log(probabilities))
  return entropies


def measure_quality(evaluator_model, evaluator_params, tokens: np.ndarray,
                    vocab_size: int) -> SampleQuality:
  nll, counts = sample_nll(evaluator_model, evaluator_params, tokens)
  gen_ppl, low, high = gen_ppl_with_interval(nll, counts)
  entropies = unigram_entropy(tokens, vocab_size)
  stderr = float(entropies.std(ddof=1) / math.sqrt(len(entropies))) if len(entropies) > 1 else 0.0
  return SampleQuality(gen_ppl, low, high, float(entropies.mean()), stderr, len(tokens),
                       int(counts.sum()))


def timed_sampling(sample_fn, rng, num_samples: int, batch_size: int):
  """Runs `sample_fn(rng, batch_size)` over batches after one warm-up call.

  Returns (tokens int32[N, L], nfe int[N], seconds per sample). The warm-up
  compiles the sampler, so the time excludes compilation.
  """
  jax.block_until_ready(sample_fn(jax.random.fold_in(rng, 10**6), batch_size).tokens)
  tokens, nfe = [], []
  start = time.perf_counter()
  for index, offset in enumerate(range(0, num_samples, batch_size)):
    output = sample_fn(jax.random.fold_in(rng, index), batch_size)
    jax.block_until_ready(output.tokens)
    tokens.append(np.asarray(output.tokens))
    nfe.append(np.asarray(output.nfe))
    del offset
  seconds = time.perf_counter() - start
  tokens = np.concatenate(tokens)[:num_samples]
  nfe = np.concatenate(nfe)[:num_samples]
  return tokens, nfe, seconds / len(tokens)


def match_temperature(entropy_at, target_entropy: float, low: float = 0.5, high: float = 1.0,
                      iterations: int = 6) -> float:
  """Finds T so that `entropy_at(T)` (increasing in T) meets the target.

  Bisects [low, high] `iterations` times, then interpolates linearly between
  the entropies at the ends of the last bracket. Returns the end of
  [low, high] when the target lies outside the range the endpoints reach.
  """
  entropy_high = entropy_at(high)
  if entropy_high <= target_entropy:
    return high
  entropy_low = entropy_at(low)
  if entropy_low >= target_entropy:
    return low

  for _ in range(iterations):
    middle = 0.5 * (low + high)
    entropy_middle = entropy_at(middle)
    if entropy_middle < target_entropy:
      low, entropy_low = middle, entropy_middle
    else:
      high, entropy_high = middle, entropy_middle

  # entropy_low < target <= entropy_high holds for every bracket, noise or not.
  fraction = (target_entropy - entropy_low) / (entropy_high - entropy_low)
  return low + fraction * (high - low)


def plot_gen_ppl_vs_nfe(rows: list[dict], path: str, title: str) -> None:
  """Writes a log-x plot of Gen PPL (with 95% intervals) against mean NFE."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, axis = plt.subplots(figsize=(6.4, 4.4))
  for name in dict.fromkeys(row['model'] for row in rows):
    selected = sorted((row for row in rows if row['model'] == name), key=lambda r: r['nfe'])
    nfe = [row['nfe'] for row in selected]
    ppl = [row['gen_ppl'] for row in selected]
    errors = np.array([[row['gen_ppl'] - row['gen_ppl_low'] for row in selected],
                       [row['gen_ppl_high'] - row['gen_ppl'] for row in selected]])
    axis.errorbar(nfe, ppl, yerr=errors, marker='o', capsize=3, label=name)
  axis.set_xscale('log', base=2)
  axis.set_xlabel('NFE per sample')
  axis.set_ylabel('Gen PPL (lower is better)')
  axis.set_title(title)
  axis.grid(True, alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
