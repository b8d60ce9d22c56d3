"""Ancestral and deterministic samplers for masked diffusion models.

Both samplers start from a fully masked sequence at t = 1 and step down the
time grid t_k = 1 - k / N, k = 0 … N, inside one `lax.scan`. A step from t to
s = t - 1/N evaluates the model once at (z_t, t) and reveals some masked
positions; revealed and fixed positions never change. The last step (s = 0,
where α_0 = 1) reveals every position still masked, so no mask id is left in
the output.

  * `ancestral_sample`: a masked position becomes token k with probability
    x_θ(z_t)_k (α_s - α_t) / (1 - α_t) and stays masked otherwise.
  * `deterministic_sample`: the noise is fixed per sample index and position.
    A position is revealed at the first step whose s falls below its masking
    time τ = α^{-1}(U), and takes argmax_k(log x_θ(z_t)_k / temperature + G_k).
    Every position is revealed once, so the fixed Gumbel G is a fresh draw at
    its reveal and both samplers have the same law.

Time-agnostic models (`time_conditioned=False`) reuse the previous logits when
no position of the batch changed since the last forward pass. NFE counts, per
sample, the forward passes the sample needed: N without caching, at most
min(N, L + 1) with it. A batch runs a forward pass whenever any of its samples
needs one, so the batch's own count is the largest NFE of its samples or more.

The public functions validate the prompt and the fixed tokens on the host, so
they are called outside `jax.jit`. They then call a jitted core with `model`,
`num_steps`, `schedule`, `mask_id`, `time_conditioned` and `forbidden` static.
Keys, parameters, temperature, conditioning values and sample indices are
traced, so changing them does not recompile. `make_sample_fn` binds the static
settings once.
"""

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcd_jax import categorical
from mcd_jax import schedules


class SampleOutput(NamedTuple):
  tokens: jax.Array  # int32[B, L], ids in [0, K)
  nfe: jax.Array  # int32[B], forward passes per sample


# ----------------------------------------------------------------------------
# Host-side checks and conditioning.


@functools.lru_cache(maxsize=None)
def _schedule_by_name(name: str) -> schedules.Schedule:
  # One instance per name: jit then gets an equal static argument on every
  # call and does not recompile.
  return schedules.get_schedule(name)


def resolve_schedule(schedule: str | schedules.Schedule) -> schedules.Schedule:
  """Returns `schedule` itself, or the cached `Schedule` of that name."""
  if isinstance(schedule, schedules.Schedule):
    return schedule
  return _schedule_by_name(schedule)


def _check_settings(batch_size, seq_len, num_steps, mask_id, temperature):
  for name, value in (('batch_size', batch_size), ('seq_len', seq_len),
                      ('num_steps', num_steps), ('mask_id', mask_id)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if not temperature > 0:
    raise ValueError(f'temperature must be positive, got {temperature!r}.')


def _check_ids(name, ids, vocab_size):
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'{name} must contain integer token ids, got dtype {ids.dtype}.')
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    raise ValueError(
        f'{name} contains ids outside [0, {vocab_size}) (the mask id is '
        f'{vocab_size}): {np.unique(bad)[:10].tolist()}.')


def _to_batch(name, array, batch_size, length):
  """Broadcasts a host array of shape [length] or [B, length] to [B, length]."""
  if array.ndim == 1:
    array = np.broadcast_to(array, (batch_size, array.shape[0]))
  if array.ndim != 2 or array.shape[0] != batch_size or array.shape[1] != length:
    raise ValueError(
        f'{name} must have shape [{length}] or [{batch_size}, {length}], got '
        f'{array.shape}.')
  return array


def initial_tokens(batch_size: int,
                   seq_len: int,
                   mask_id: int,
                   prefix=None,
                   fixed_tokens=None,
                   fixed_mask=None) -> np.ndarray:
  """Builds the starting sequence: fixed tokens where given, mask id elsewhere.

  Args:
    batch_size, seq_len: B and L.
    mask_id: K, the mask id; token ids must lie in [0, K).
    prefix: int[P] or int[B, P], the prompt held at positions 0 … P-1.
    fixed_tokens: int[L] or int[B, L], tokens held where `fixed_mask` is True.
    fixed_mask: bool[L] or bool[B, L], the positions to hold (infilling).

  Returns:
    Host int32[B, L]. The samplers never mask or resample the fixed positions.

  Raises:
    ValueError: for a prompt longer than `seq_len`, ids outside [0, K), shapes
      that do not match, only one of `fixed_tokens` and `fixed_mask`, or a
      position where the prompt and `fixed_tokens` disagree.
  """
  tokens = np.full((batch_size, seq_len), mask_id, dtype=np.int32)
  fixed = np.zeros((batch_size, seq_len), dtype=bool)

  if (fixed_tokens is None) != (fixed_mask is None):
    raise ValueError('Infilling needs both fixed_tokens and fixed_mask, or neither.')
  if fixed_tokens is not None:
    values = _to_batch('fixed_tokens', np.asarray(fixed_tokens), batch_size, seq_len)
    mask = _to_batch('fixed_mask', np.asarray(fixed_mask), batch_size, seq_len)
    if mask.dtype != np.bool_:
      raise ValueError(f'fixed_mask must be boolean, got dtype {mask.dtype}.')
    _check_ids('fixed_tokens', values[mask], mask_id)
    tokens = np.where(mask, values, tokens).astype(np.int32)
    fixed = mask.copy()

  if prefix is not None:
    prompt = np.asarray(prefix)
    if prompt.ndim not in (1, 2):
      raise ValueError(f'prefix must have shape [P] or [B, P], got {prompt.shape}.')
    length = prompt.shape[-1]
    if length > seq_len:
      raise ValueError(
          f'The prompt has {length} tokens but seq_len is {seq_len}; shorten the '
          'prompt or raise seq_len.')
    prompt = _to_batch('prefix', prompt, batch_size, length)
    _check_ids('prefix', prompt, mask_id)
    clash = fixed[:, :length] & (tokens[:, :length] != prompt)
    if clash.any():
      raise ValueError(
          'prefix and fixed_tokens hold different tokens at positions '
          f'{np.unique(np.nonzero(clash)[1]).tolist()}.')
    tokens[:, :length] = prompt
  return tokens


def _forbidden_ids(forbidden, vocab_size) -> tuple[int, ...] | None:
  mask = categorical.forbidden_mask(forbidden, vocab_size)
  return None if mask is None else tuple(int(i) for i in np.flatnonzero(mask))


# ----------------------------------------------------------------------------
# One step of each sampler.


def ancestral_step(rng, tokens, log_probs, alpha_t, alpha_s, *, mask_id,
                   temperature=1.0, forbidden=None, final=False):
  """Takes one ancestral step from time t to s < t.

  A masked position becomes token k with probability
  x_θ(z_t)_k (α_s - α_t) / (1 - α_t) and stays masked otherwise. Where `final`
  is True every masked position is revealed. Unmasked positions never change.

  Args:
    rng: PRNG key.
    tokens: int32[B, L], z_t.
    log_probs: float[B, L, K], log x_θ(z_t, t) over the K real tokens.
    alpha_t, alpha_s: α at t and s, scalars or float[B].
    mask_id: K.
    temperature: divides the log-probabilities before sampling.
    forbidden: bool[K] or ids never drawn (see `categorical.gumbel_argmax`).
    final: bool, Python or traced; True at the step to s = 0.

  Returns:
    int32[B, L], z_s.
  """
  gumbel, draw = _noise_from_bits(
      jax.random.bits(rng, (2,) + tokens.shape + (mask_id + 1,), jnp.uint32), mask_id)
  alpha_t = jnp.reshape(alpha_t, (-1, 1))
  alpha_s = jnp.reshape(alpha_s, (-1, 1))

  # Reveal with probability (α_s - α_t) / (1 - α_t), then draw the token.
  mask_probability = jnp.maximum(1.0 - alpha_t, jnp.finfo(jnp.float32).tiny)
  reveal_probability = jnp.clip((alpha_s - alpha_t) / mask_probability, 0.0, 1.0)
  reveal = (tokens == mask_id) & ((draw < reveal_probability) | final)
  sampled = categorical.gumbel_argmax(
      log_probs, gumbel, temperature=temperature, forbidden=forbidden)
  return jnp.where(reveal, sampled, tokens).astype(jnp.int32)


def _noise_from_bits(bits, vocab_size):
  """Splits uint32[2, ..., K + 1] into Gumbel noise [..., K] and a uniform [...].

  One `jax.random.bits` call per step serves both draws, which keeps the
  number of PRNG call sites, and so the compile time, small.
  """
  gumbel = categorical.gumbel_from_bits(bits[0, ..., :vocab_size], bits[1, ..., :vocab_size])
  draw = categorical.uniform_from_bits(
      bits[0, ..., vocab_size], bits[1, ..., vocab_size], jnp.float32)
  return gumbel, draw


def position_keys(noise_key, sample_indices, seq_len: int):
  """Returns the keys [B, L] of fold_in(fold_in(noise_key, sample index), position).

  They depend on the sample index and position only, never on the batch.
  """
  def sample_keys(index):
    key = jax.random.fold_in(noise_key, index)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(seq_len))

  return jax.vmap(sample_keys)(sample_indices)


def position_noise(keys, vocab_size: int):
  """Returns the fixed noise of each position: Gumbel float[B, L, K] and U float32[B, L].

  U ~ U(0, 1) gives the masking time τ = α^{-1}(U). Both are the same at every
  step because they are regenerated from the same per-position keys.
  """
  bits = jax.vmap(jax.vmap(
      lambda key: jax.random.bits(key, (2, vocab_size + 1), jnp.uint32)))(keys)
  return _noise_from_bits(jnp.moveaxis(bits, 2, 0), vocab_size)


# ----------------------------------------------------------------------------
# The shared loop over steps.


def _log_probs(model, params, tokens, t, mask_id):
  logits = model.apply({'params': params}, tokens, t, deterministic=True)
  if logits.shape != tokens.shape + (mask_id,):
    raise ValueError(
        f'The model returned logits of shape {logits.shape}; expected '
        f'{tokens.shape + (mask_id,)}, one logit per real token (mask_id = K).')
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _run_steps(model, params, tokens, update: Callable, step_inputs, *,
               num_steps, mask_id, time_conditioned):
  """Scans `update(tokens, log_probs, step, t, s, step_input)` over N steps."""
  batch_size = tokens.shape[0]

  def evaluate(tokens, t):
    return _log_probs(model, params, tokens, jnp.full((batch_size,), t), mask_id)

  def body(carry, inputs):
    tokens, cached, stale, nfe = carry
    step, step_input = inputs
    t = 1.0 - step.astype(jnp.float32) / num_steps
    s = 1.0 - (step + 1).astype(jnp.float32) / num_steps

    # A time-agnostic model gives the same logits for the same tokens.
    if time_conditioned:
      log_probs = evaluate(tokens, t)
      nfe = nfe + 1
    else:
      log_probs = jax.lax.cond(
          jnp.any(stale), lambda: evaluate(tokens, t), lambda: cached)
      nfe = nfe + stale.astype(jnp.int32)
      cached = log_probs

    new_tokens = update(tokens, log_probs, step, t, s, step_input)
    stale = jnp.any(new_tokens != tokens, axis=-1)
    return (new_tokens, cached, stale, nfe), None

  cached = None
  if not time_conditioned:
    cached = jnp.zeros(tokens.shape + (mask_id,), jnp.float32)
  carry = (tokens, cached, jnp.ones((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.int32))
  steps = jnp.arange(num_steps, dtype=jnp.int32)
  (tokens, _, _, nfe), _ = jax.lax.scan(body, carry, (steps, step_inputs))
  return SampleOutput(tokens=tokens, nfe=nfe)


_STATIC = ('model', 'num_steps', 'schedule', 'mask_id', 'time_conditioned', 'forbidden')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ancestral_core(model, params, rng, tokens, temperature, *, num_steps,
                    schedule, mask_id, time_conditioned, forbidden):
  def update(tokens, log_probs, step, t, s, step_rng):
    return ancestral_step(
        step_rng, tokens, log_probs, schedule.alpha(t), schedule.alpha(s),
        mask_id=mask_id, temperature=temperature, forbidden=forbidden,
        final=step == num_steps - 1)

  return _run_steps(model, params, tokens, update, jax.random.split(rng, num_steps),
                    num_steps=num_steps, mask_id=mask_id,
                    time_conditioned=time_conditioned)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _deterministic_core(model, params, noise_key, tokens, sample_indices, temperature,
                        *, num_steps, schedule, mask_id, time_conditioned, forbidden):
  keys = position_keys(noise_key, sample_indices, tokens.shape[1])

  def update(tokens, log_probs, step, t, s, _):
    # Regenerated each step from the same keys, so the scan carries no [B, L, K] noise.
    gumbel, uniform = position_noise(keys, mask_id)
    masking_time = schedule.masking_time(uniform)

    # Revealed now: still masked and τ > s, or any masked position at s = 0.
    final = step == num_steps - 1
    reveal = (tokens == mask_id) & ((masking_time > s) | final)
    sampled = categorical.gumbel_argmax(
        log_probs, gumbel, temperature=temperature, forbidden=forbidden)
    return jnp.where(reveal, sampled, tokens).astype(jnp.int32)

  return _run_steps(model, params, tokens, update, None, num_steps=num_steps,
                    mask_id=mask_id, time_conditioned=time_conditioned)


# ----------------------------------------------------------------------------
# Public samplers.


def ancestral_sample(model, params, rng, *, batch_size: int, seq_len: int,
                     num_steps: int, schedule: str | schedules.Schedule,
                     mask_id: int, temperature: float = 1.0, prefix=None,
                     fixed_tokens=None, fixed_mask=None,
                     time_conditioned: bool = True,
                     forbidden: Sequence[int] | None = None,
                     return_nfe: bool = True):
  """Samples B sequences with N ancestral steps from t = 1 to t = 0.

  Args:
    model: Linen module called as `model.apply({'params': params}, tokens,
      t, deterministic=True)` -> float[B, L, K] logits over the K real tokens.
    params: the model parameters.
    rng: PRNG key.
    batch_size, seq_len, num_steps: B, L and N.
    schedule: a `schedules.Schedule` or its name.
    mask_id: K, the mask id and the vocabulary size.
    temperature: positive; divides log x_θ before each draw.
    prefix: int[P] or int[B, P] prompt held at positions 0 … P-1.
    fixed_tokens, fixed_mask: int and bool [L] or [B, L]; tokens held at the
      True positions (infilling).
    time_conditioned: False for a model that ignores t; logits are then reused
      while no position changes.
    forbidden: token ids never sampled.
    return_nfe: return `SampleOutput(tokens, nfe)` if True, else the tokens.

  Returns:
    `SampleOutput` with int32[B, L] tokens in [0, K) and int32[B] NFE.
  """
  _check_settings(batch_size, seq_len, num_steps, mask_id, temperature)
  tokens = initial_tokens(batch_size, seq_len, mask_id, prefix, fixed_tokens, fixed_mask)
  output = _ancestral_core(
      model, params, rng, jnp.asarray(tokens), jnp.float32(temperature),
      num_steps=num_steps, schedule=resolve_schedule(schedule), mask_id=mask_id,
      time_conditioned=time_conditioned, forbidden=_forbidden_ids(forbidden, mask_id))
  return output if return_nfe else output.tokens


def deterministic_sample(model, params, noise_key, *, batch_size: int, seq_len: int,
                         num_steps: int, schedule: str | schedules.Schedule,
                         mask_id: int, temperature: float = 1.0,
                         sample_offset: int = 0, sample_indices=None, prefix=None,
                         fixed_tokens=None, fixed_mask=None,
                         time_conditioned: bool = True,
                         forbidden: Sequence[int] | None = None,
                         return_nfe: bool = True):
  """Samples B sequences as a deterministic function of (noise_key, sample index).

  Row b is sample number `sample_indices[b]` (default `sample_offset + b`).
  Its reveal times and Gumbel noise come from fold_in(noise_key, index), so
  the same index gives the same text in any batch, up to floating-point
  differences of the model between batch shapes. Other arguments are as in
  `ancestral_sample`.

  Returns:
    `SampleOutput` with int32[B, L] tokens in [0, K) and int32[B] NFE.
  """
  _check_settings(batch_size, seq_len, num_steps, mask_id, temperature)
  tokens = initial_tokens(batch_size, seq_len, mask_id, prefix, fixed_tokens, fixed_mask)
  if sample_indices is None:
    sample_indices = jnp.int32(sample_offset) + jnp.arange(batch_size, dtype=jnp.int32)
  elif np.shape(sample_indices) != (batch_size,):
    raise ValueError(
        f'sample_indices must have shape ({batch_size},), got {np.shape(sample_indices)}.')
  output = _deterministic_core(
      model, params, noise_key, jnp.asarray(tokens), jnp.asarray(sample_indices, jnp.int32),
      jnp.float32(temperature), num_steps=num_steps, schedule=resolve_schedule(schedule),
      mask_id=mask_id, time_conditioned=time_conditioned,
      forbidden=_forbidden_ids(forbidden, mask_id))
  return output if return_nfe else output.tokens


SAMPLERS = {'ancestral': ancestral_sample, 'deterministic': deterministic_sample}


def make_sample_fn(model, *, sampler: str = 'ancestral', **settings):
  """Binds `model`, the sampler and its settings; returns `fn(params, key, **more)`.

  `settings` are keyword arguments of the chosen sampler: batch_size, seq_len,
  num_steps, schedule, mask_id, temperature and so on. `more` adds or
  overrides per-call ones such as `prefix` or `sample_offset`. Every call with
  the same shapes reuses one compiled program.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.')
  sample = SAMPLERS[sampler]

  def sample_fn(params, key, **more):
    return sample(model, params, key, **{**settings, **more})

  return sample_fn
