"""Exact sampler distributions on a tiny source, by dynamic programming over partial states.

A source is a distribution p(x) over all V^L sequences of length L over V symbols,
small enough to enumerate (L = 6 and V = 4 give 4,096 sequences and 5^6 = 15,625
partial states). A partial state z has symbol V (the mask id) at masked positions.
States and sequences are indexed in row-major order: state z has index
Σ_i z_i (V+1)^(L-1-i), sequence x has index Σ_i x_i V^(L-1-i).

A denoiser is a table float[S, L, V]: row z gives, at each position, a
distribution over the V real symbols. Samplers only read masked positions.

Everything here is numpy in float64 except `model_denoiser_table`, which runs a
JAX model on all partial states.
"""

import functools
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.special

from mcd_jax import schedules

Denoiser = Union[np.ndarray, Callable[[float], np.ndarray]]


# ---- States and sources ----


def num_states(seq_len: int, vocab_size: int) -> int:
  return (vocab_size + 1) ** seq_len


def all_partial_states(seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns int32[(V+1)^L, L], every partial state in index order, mask id = V."""
  grids = np.indices((vocab_size + 1,) * seq_len).reshape(seq_len, -1)
  return grids.T.astype(np.int32)


def all_sequences(seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns int32[V^L, L], every complete sequence in index order."""
  grids = np.indices((vocab_size,) * seq_len).reshape(seq_len, -1)
  return grids.T.astype(np.int32)


def sequence_state_indices(seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns int[V^L], the partial-state index of each complete sequence."""
  powers = (vocab_size + 1) ** np.arange(seq_len - 1, -1, -1)
  return all_sequences(seq_len, vocab_size) @ powers


def _normalise_source(probs, seq_len, vocab_size, smoothing):
  probs = (1.0 - smoothing) * probs + smoothing / probs.size
  probs = probs / probs.sum()
  return probs.reshape(vocab_size ** seq_len)


def markov_source(seq_len: int, vocab_size: int, seed: int, concentration: float = 0.2,
                  smoothing: float = 1e-3) -> np.ndarray:
  """Returns float64[V^L], a random first-order Markov chain over sequences.

  The transition rows are Dirichlet(concentration) draws, so a small
  concentration makes each symbol nearly determine the next one and parallel
  reveals of neighbours often disagree. `smoothing` mixes in that share of the
  uniform distribution, so every sequence has probability >= smoothing / V^L
  and a KL to the source stays finite.
  """
  rng = np.random.default_rng(seed)
  initial = rng.dirichlet(np.ones(vocab_size))
  transition = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
  probs = initial
  for _ in range(seq_len - 1):
    probs = probs[..., :, None] * transition  # Appends one axis per position.
  return _normalise_source(probs, seq_len, vocab_size, smoothing)


def mixture_source(seq_len: int, vocab_size: int, seed: int, num_components: int = 3,
                   concentration: float = 0.2, smoothing: float = 1e-3) -> np.ndarray:
  """Returns float64[V^L], a mixture of product distributions over sequences.

  Each component draws every position from its own Dirichlet(concentration)
  distribution. The positions depend on each other only through the shared
  component, so a sequence mixing two components is unlikely while every
  per-position marginal allows it. `smoothing` is as in `markov_source`.
  """
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.ones(num_components))
  probs = np.zeros((vocab_size,) * seq_len)
  for weight in weights:
    component = np.ones(())
    for _ in range(seq_len):
      marginal = rng.dirichlet(np.full(vocab_size, concentration))
      component = np.multiply.outer(component, marginal)
    probs += weight * component
  return _normalise_source(probs, seq_len, vocab_size, smoothing)


# ---- The exact posterior denoiser ----


def marginal_table(source_probs, seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns float64[(V+1)^L], p(x agrees with z on the unmasked positions of z).

  Built by appending, along every axis, the sum over that axis as the entry
  for the mask id.
  """
  table = np.asarray(source_probs, np.float64).reshape((vocab_size,) * seq_len)
  for axis in range(seq_len):
    table = np.concatenate([table, table.sum(axis=axis, keepdims=True)], axis=axis)
  return table.reshape(-1)


def posterior_denoiser(source_probs, seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns the exact posterior x*(z)_{i,k} = p(x_i = k | unmasked positions of z).

  The result is float64[(V+1)^L, L, V]. Unmasked positions are one-hot on their
  symbol, as in the SUBS parameterization. A state that the source cannot
  produce has no posterior, so its masked positions get the uniform
  distribution. The table does not depend on time.
  """
  size = vocab_size + 1
  marginals = marginal_table(source_probs, seq_len, vocab_size)
  tensor = marginals.reshape((size,) * seq_len)
  states = all_partial_states(seq_len, vocab_size)
  table = np.empty((marginals.size, seq_len, vocab_size))

  for i in range(seq_len):
    # joint[z, k] = p(x_i = k, x_O = z_O) for the unmasked set O of z without i.
    joint = np.moveaxis(np.take(tensor, np.arange(vocab_size), axis=i), i, -1)
    joint = np.broadcast_to(np.expand_dims(joint, i), (size,) * seq_len + (vocab_size,))
    table[:, i, :] = joint.reshape(-1, vocab_size)

  possible = marginals > 0
  table[possible] /= marginals[possible, None, None]
  table[~possible] = 1.0 / vocab_size

  unmasked = states < vocab_size  # [S, L]
  one_hot = np.eye(vocab_size)[np.minimum(states, vocab_size - 1)]
  table[unmasked] = one_hot[unmasked]
  return table


# ---- The N-step ancestral sampler ----


@functools.lru_cache(maxsize=4)
def _transition_pairs(seq_len: int, vocab_size: int):
  """Enumerates every pair (z -> z') of one sampler step: z' reveals some masked positions of z.

  Per position a code c in [0, 2V] means: c < V unmasked with symbol c, c = V
  masked and kept masked, c > V masked and revealed as symbol c - V - 1. There
  are (2V+1)^L pairs. Returns a dict of int arrays over pairs: 'source' and
  'target' state indices, 'codes' [P, L], 'num_revealed', and 'num_masked'
  (masked positions in the source state).
  """
  codes = all_partial_states(seq_len, 2 * vocab_size)  # Base 2V+1, values 0..2V.
  source_digits = np.minimum(codes, vocab_size)
  target_digits = np.where(codes > vocab_size, codes - vocab_size - 1, codes)
  powers = (vocab_size + 1) ** np.arange(seq_len - 1, -1, -1)
  return {
      'source': source_digits @ powers,
      'target': target_digits @ powers,
      'codes': codes,
      'num_revealed': np.sum(codes > vocab_size, axis=1),
      'num_masked': np.sum(codes >= vocab_size, axis=1),
  }


def _reveal_products(table, pairs, vocab_size):
  """Returns float64[P], Π over revealed positions of the denoiser's probability of the revealed symbol."""
  codes, source = pairs['codes'], pairs['source']
  products = np.ones(source.shape[0])
  for i in range(codes.shape[1]):
    revealed = codes[:, i] > vocab_size
    symbols = codes[revealed, i] - vocab_size - 1
    products[revealed] *= table[source[revealed], i, symbols]
  return products


def _step_operators(table, pairs, seq_len, vocab_size):
  """Returns one sparse [S, S] matrix per number a of revealed positions, a = 0..L.

  Entry (z', z) is the product of the denoiser's probabilities of the symbols
  z' reveals. A step with reveal probability r maps the state distribution π to
  Σ_a r^a · A_a (π ⊙ (1 - r)^(m - a)), with m the number of masked positions.
  """
  size = num_states(seq_len, vocab_size)
  products = _reveal_products(table, pairs, vocab_size)
  operators = []
  for count in range(seq_len + 1):
    selected = pairs['num_revealed'] == count
    operators.append(scipy.sparse.csr_matrix(
        (products[selected], (pairs['target'][selected], pairs['source'][selected])),
        shape=(size, size)))
  return operators


def step_alphas(schedule: schedules.Schedule, num_steps: int) -> np.ndarray:
  """Returns float64[N + 1], α at the sampler's times t_n = 1 - n / N, n = 0..N.

  NOTE: a schedule built on jnp (cosine) returns float32, so α is then accurate
  to about 1e-7. Linear and log-linear evaluate in float64 on numpy input.
  """
  times = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
  return np.asarray(schedule.alpha(times), dtype=np.float64)


def sampler_distribution(denoiser: Denoiser, num_steps: int, schedule: schedules.Schedule,
                         seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns float64[V^L], the exact output distribution of the N-step ancestral sampler.

  The sampler starts fully masked at t = 1 and steps through t_n = 1 - n / N.
  In a step from t to s, every masked position is revealed independently with
  probability (α_s - α_t) / (1 - α_t), and a revealed position draws its symbol
  from the denoiser at the state before the step. The last step reveals
  everything.

  Args:
    denoiser: a table float[S, L, V], or a function t -> table for a
      time-conditioned denoiser, called with each step's start time.
    num_steps: N >= 1.
    schedule: the masking schedule α_t.
    seq_len, vocab_size: L and V.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  pairs = _transition_pairs(seq_len, vocab_size)
  states = all_partial_states(seq_len, vocab_size)
  num_masked = np.sum(states == vocab_size, axis=1)  # [S]
  alphas = step_alphas(schedule, num_steps)

  distribution = np.zeros(num_states(seq_len, vocab_size))
  distribution[-1] = 1.0  # The fully masked state has the largest index.
  operators, operators_table = None, None
  for n in range(num_steps):
    t = 1.0 - n / num_steps
    table = denoiser(t) if callable(denoiser) else denoiser
    if table is not operators_table:
      operators = _step_operators(np.asarray(table, np.float64), pairs, seq_len, vocab_size)
      operators_table = table

    if n == num_steps - 1:
      reveal = 1.0
    else:
      reveal = (alphas[n + 1] - alphas[n]) / max(1.0 - alphas[n], 1e-300)
      reveal = float(np.clip(reveal, 0.0, 1.0))

    new_distribution = np.zeros_like(distribution)
    for count, operator in enumerate(operators):
      stay = np.where(num_masked >= count, (1.0 - reveal) ** np.maximum(num_masked - count, 0), 0.0)
      new_distribution += reveal ** count * (operator @ (distribution * stay))
    distribution = new_distribution

  return distribution[sequence_state_indices(seq_len, vocab_size)]


def product_of_marginals(source_probs, seq_len: int, vocab_size: int) -> np.ndarray:
  """Returns float64[V^L], Π_i p(x_i): the 1-step sampler with the exact posterior."""
  tensor = np.asarray(source_probs, np.float64).reshape((vocab_size,) * seq_len)
  result = np.ones(())
  for i in range(seq_len):
    axes = tuple(j for j in range(seq_len) if j != i)
    result = np.multiply.outer(result, tensor.sum(axis=axes))
  return result.reshape(-1)


# ---- Divergences ----


def kl_divergence(p, q) -> float:
  """Returns KL(p ‖ q) in nats; inf if p puts mass where q has none."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  support = p > 0
  if np.any(q[support] <= 0):
    return float('inf')
  return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


def entropy(p) -> float:
  """Returns the entropy of p in nats."""
  p = np.asarray(p, np.float64)
  support = p > 0
  return float(-np.sum(p[support] * np.log(p[support])))


# ---- The exact MCD optimum over the data coupling ----


def _expected_teacher_log_probs(teacher_log_probs, marginals, reveal, pairs, seq_len,
                                vocab_size):
  """Returns ℓ[z, i, k] = E[log teacher(z_s)_{i,k} | z_t = z, i still masked in z_s].

  Given z_t, the data x follows the source posterior and each masked position
  is revealed in z_s independently with probability `reveal`. The probability
  of z_s is then reveal^a (1 - reveal)^(m - a) · p(z_s) / p(z_t), with a
  reveals out of m masked positions.
  """
  source, target = pairs['source'], pairs['target']
  count, masked = pairs['num_revealed'], pairs['num_masked']
  possible = marginals[source] > 0
  weights = np.zeros(source.shape[0])
  weights[possible] = (reveal ** count[possible] * (1.0 - reveal) ** (masked - count)[possible]
                       * marginals[target[possible]] / marginals[source[possible]])

  size = marginals.size
  expected = np.zeros((size, seq_len, vocab_size))
  for i in range(seq_len):
    stays = pairs['codes'][:, i] == vocab_size
    for k in range(vocab_size):
      expected[:, i, k] = np.bincount(
          source[stays], weights=weights[stays] * teacher_log_probs[target[stays], i, k],
          minlength=size)
  # The weights include (1 - reveal) for position i itself; divide it out to condition on it.
  return expected / (1.0 - reveal)


def _minimise_ce_plus_reverse_kl(posterior, expected_log_probs, reveal, iterations=64):
  """Minimises reveal·CE(posterior, p) + (1 - reveal)·(Σ p log p - Σ p ℓ) over p on the simplex.

  posterior, expected_log_probs: float64[N, V]. The stationarity condition is
  log p_k = ℓ_k + μ + ω(log(reveal·m_k / (1 - reveal)) - ℓ_k - μ), with ω the
  Wright omega function (ω(y) = W(e^y)) and μ set by bisection so that p sums
  to 1. Σ_k p_k is increasing in μ and is >= 1 at μ = -logsumexp(ℓ).
  """
  keep = 1.0 - reveal
  with np.errstate(divide='ignore'):
    log_ratio = np.log(reveal * posterior / keep)  # -inf where the posterior is 0.

  def log_p(mu):
    argument = log_ratio - expected_log_probs - mu[:, None]
    omega = np.where(np.isfinite(argument),
                     scipy.special.wrightomega(np.where(np.isfinite(argument), argument, 0.0)).real,
                     0.0)
    return expected_log_probs + mu[:, None] + omega

  def total(mu):
    return np.exp(log_p(mu)).sum(axis=1)

  high = -scipy.special.logsumexp(expected_log_probs, axis=1)
  gap = np.ones_like(high)
  for _ in range(64):
    too_large = total(high - gap) > 1.0
    if not np.any(too_large):
      break
    gap = np.where(too_large, 2.0 * gap, gap)
  else:
    raise FloatingPointError('Failed to bracket the normaliser μ of the MCD optimum; '
                             'check the inputs for NaN.')
  low = high - gap

  for _ in range(iterations):
    middle = 0.5 * (low + high)
    above = total(middle) > 1.0
    high = np.where(above, middle, high)
    low = np.where(above, low, middle)
  probs = np.exp(log_p(0.5 * (low + high)))
  return probs / probs.sum(axis=1, keepdims=True)


def mcd_optimal_denoiser(source_probs, seq_len: int, vocab_size: int, t: float, delta: float,
                         schedule: schedules.Schedule, teacher_table=None,
                         log_prob_floor: float = -30.0) -> np.ndarray:
  """Returns float64[S, L, V], the student at time t that minimises the expected MCD loss.

  The loss is the reverse-KL MCD loss of `mcd_jax.distill.mcd.mcd_loss` with
  the data trajectory, s = max(t - Δ, 0), and the teacher at z_s taken from
  `teacher_table` (default: the exact posterior), floored at `log_prob_floor`
  and renormalised. For each state z_t and masked position i, the student's
  distribution p minimises

    a · E[-log p(x_i) | z_t] + (1 - a) · E[KL(p ‖ teacher(z_s)_i) | z_t, i masked in z_s],

  with a = (α_s - α_t) / (1 - α_t). When a = 0 this is the normalised geometric
  mean of the teacher's predictions at z_s; the cross-entropy term pulls it
  towards the posterior. Unmasked positions are one-hot, and states the source
  cannot produce keep the teacher's table.
  """
  if teacher_table is None:
    teacher_table = posterior_denoiser(source_probs, seq_len, vocab_size)
  s = max(t - delta, 0.0)
  alpha_t, alpha_s = (float(np.asarray(schedule.alpha(np.float64(x)))) for x in (t, s))
  if alpha_t >= 1.0:
    raise ValueError(f'No position is masked at t = {t}; use a time with α_t < 1.')
  reveal = float(np.clip((alpha_s - alpha_t) / (1.0 - alpha_t), 0.0, 1.0))

  marginals = marginal_table(source_probs, seq_len, vocab_size)
  posterior = posterior_denoiser(source_probs, seq_len, vocab_size)
  states = all_partial_states(seq_len, vocab_size)
  cells = (states == vocab_size) & (marginals > 0)[:, None]  # [S, L]: what to solve.
  result = np.array(teacher_table, dtype=np.float64, copy=True)
  if reveal >= 1.0:
    result[cells] = posterior[cells]
    return result

  with np.errstate(divide='ignore'):
    teacher_log_probs = np.maximum(np.log(teacher_table), log_prob_floor)
  teacher_log_probs -= scipy.special.logsumexp(teacher_log_probs, axis=-1, keepdims=True)
  pairs = _transition_pairs(seq_len, vocab_size)
  expected = _expected_teacher_log_probs(teacher_log_probs, marginals, reveal, pairs,
                                         seq_len, vocab_size)

  if reveal <= 0.0:
    result[cells] = scipy.special.softmax(expected[cells], axis=-1)
  else:
    result[cells] = _minimise_ce_plus_reverse_kl(posterior[cells], expected[cells], reveal)
  return result


# ---- Temperature control ----


def tempered_table(table, temperature: float) -> np.ndarray:
  """Raises each distribution of `table` to 1 / temperature and renormalises."""
  with np.errstate(divide='ignore'):
    logits = np.log(table) / temperature
  logits -= logits.max(axis=-1, keepdims=True)
  probabilities = np.exp(logits)
  return probabilities / probabilities.sum(axis=-1, keepdims=True)


def entropy_matched_sampler(teacher_table, target_entropy: float, num_steps: int,
                            schedule: schedules.Schedule, seq_len: int, vocab_size: int,
                            xtol: float = 1e-6) -> tuple[float, np.ndarray]:
  """Returns (T, sampler distribution) of the teacher at temperature T whose entropy
  equals `target_entropy`: the sharpening-only control for a distilled student.

  Entropy grows with T; the search covers T in [e^-3, e^1]. When the target lies
  outside that range, T is NaN and the distribution is the teacher's at T = 1.
  """

  def distribution(temperature):
    return sampler_distribution(tempered_table(teacher_table, temperature), num_steps,
                                schedule, seq_len, vocab_size)

  def gap(log_temperature):
    return entropy(distribution(np.exp(log_temperature))) - target_entropy

  if gap(-3.0) > 0 or gap(1.0) < 0:
    return float('nan'), distribution(1.0)
  log_temperature = scipy.optimize.brentq(gap, -3.0, 1.0, xtol=xtol)
  return float(np.exp(log_temperature)), distribution(np.exp(log_temperature))


# ---- A JAX model's denoiser table ----


def model_denoiser_table(model, params, seq_len: int, vocab_size: int, t: float = 1.0,
                         batch_size: int = 4096) -> np.ndarray:
  """Returns float64[S, L, V], softmax of the model's logits at every partial state.

  The model is called as model.apply({'params': params}, tokens, t) with the
  mask id V, in batches of `batch_size` states (the last one padded, so the
  function compiles once). Unmasked positions are set one-hot, as in SUBS.
  """
  @jax.jit
  def probabilities(params, tokens, times):
    logits = model.apply({'params': params}, tokens, times, deterministic=True)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  states = all_partial_states(seq_len, vocab_size)
  size = states.shape[0]
  batch_size = min(batch_size, size)
  times = jnp.full((batch_size,), t, jnp.float32)
  chunks = []
  for start in range(0, size, batch_size):
    batch = states[start:start + batch_size]
    padded = np.zeros((batch_size, seq_len), np.int32)
    padded[:len(batch)] = batch
    chunks.append(np.asarray(probabilities(params, jnp.asarray(padded), times))[:len(batch)])
  table = np.concatenate(chunks).astype(np.float64)

  unmasked = states < vocab_size
  table[unmasked] = np.eye(vocab_size)[states[unmasked]]
  return table
