"""Categorical sampling by Gumbel-max, with noise that keeps the Gumbel tails.

The usual float32 Gumbel noise -log(-log(U)) draws U from a 32-bit float whose
values near 1 are 2^-23 apart, so the noise never exceeds about 16
(-log(2^-23) ≈ 15.9). A token whose log-probability is more than about 16 below
the leader's then wins only when the leader's own noise is unusually low, and
one more than about 20 below never wins. So the tail of the distribution is
lost and the effective temperature drops.

Here a draw consumes two 32-bit words. One bit picks the half of (0, 1) that
U falls in, and the other 63 bits give the distance `w` from the nearer end,
so U is resolved on a 2^-64 grid at both ends:

  U = w / 2       (lower half):  E = -log U = log 2 - log w
  U = 1 - w / 2   (upper half):  E = -log U = -log1p(-w / 2)

and G = -log E is Gumbel. With float64 enabled (`jax_enable_x64`) the noise
and scores are computed in float64, otherwise in float32.

Exactness. The noise is the Gumbel quantile of a point of the 2^-64 grid,
rounded to the working float type.
  1. Truncation: G lies in [-3.81, 45.06] instead of the whole real line.
     Each end carries about 2^-65 of probability, so the total variation
     distance to exact Gumbel-max is at most about K * 2^-64 (under 1.5e-14 for
     K = 2^18).
  2. Grid: couple G with an exact Gumbel draw in the same grid cell. The
     expected cell width is (range of G) * 2^-64 ≈ 2^-58. The winner changes
     only if a coordinate's score lies within its cell width of the best other
     score, which has a Gumbel density (at most 1/e) independent of that
     coordinate. So each coordinate flips the outcome with probability below
     2^-58, and all K together below 2^-40 for K = 2^18.
  3. Rounding: the score log p + G is rounded to one ulp, as the float32
     log-probabilities themselves are. That is a relative error of about
     2^-24 * |score| in a token's probability (≈ 1e-6 for |score| = 16), the
     precision of the input itself.
Items 1 and 2 are far below 2^-24, the float32 resolution of a probability near
1, so the bias of the sampler is that of the float32 input and nothing more.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Bits of the first word kept for `w`. The top bit picks the half of (0, 1).
_LOW_31_BITS = np.uint32(0x7FFFFFFF)


def noise_dtype():
  """Returns float64 when `jax_enable_x64` is on, float32 otherwise."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def gumbel_from_bits(high_bits, low_bits, dtype=None):
  """Maps two uint32 words per element to Gumbel noise with exact tails.

  Args:
    high_bits, low_bits: uint32 arrays of the same shape. The top bit of
      `high_bits` picks the half of (0, 1). Its other 31 bits and the 32 bits
      of `low_bits` give the distance to the nearer end on a 2^-64 grid.
    dtype: float32 or float64; defaults to `noise_dtype()`.

  Returns:
    Gumbel noise in [-3.81, 45.06], an array of `dtype` and the input shape.
    The map is deterministic and increasing in U, so the tests can check the
    extreme bit patterns against the float64 Gumbel quantile.
  """
  dtype = noise_dtype() if dtype is None else dtype

  # w in (0, 1]: the 63-bit integer plus one half, times 2^-63, never 0.
  upper_half = (high_bits >> 31) == 1
  high = (high_bits & _LOW_31_BITS).astype(dtype)
  low = (low_bits.astype(dtype) + 0.5) * (2.0**-32)
  w = (high + low) * (2.0**-31)

  # E = -log U, each half evaluated where it has relative precision.
  exponential = jnp.where(upper_half, -jnp.log1p(-0.5 * w), np.log(2.0) - jnp.log(w))
  return -jnp.log(exponential)


def gumbel_noise(rng, shape, dtype=None):
  """Draws Gumbel noise of `shape` whose tails reach about ±45 (see module docstring)."""
  bits = jax.random.bits(rng, (2,) + tuple(shape), jnp.uint32)
  return gumbel_from_bits(bits[0], bits[1], dtype)


def uniform_from_bits(high_bits, low_bits, dtype=None):
  """Maps two uint32 words to U in (0, 1) on a 2^-64 grid, fine near 0 and near 1."""
  dtype = noise_dtype() if dtype is None else dtype
  upper_half = (high_bits >> 31) == 1
  high = (high_bits & _LOW_31_BITS).astype(dtype)
  low = (low_bits.astype(dtype) + 0.5) * (2.0**-32)
  half_w = (high + low) * (2.0**-32)  # w / 2, in (0, 1/2]
  return jnp.where(upper_half, 1.0 - half_w, half_w)


def uniform(rng, shape, dtype=None):
  """Draws U ~ U(0, 1) of `shape` from 64 random bits per element.

  Small values keep the relative precision of `dtype` down to 2^-64, so
  `uniform(...) < p` is a Bernoulli(p) draw even for p far below 2^-24.
  Values near 1 are limited by the spacing of `dtype` there (2^-24 in float32).
  """
  bits = jax.random.bits(rng, (2,) + tuple(shape), jnp.uint32)
  return uniform_from_bits(bits[0], bits[1], dtype)


def forbidden_mask(forbidden, num_classes: int) -> np.ndarray | None:
  """Converts `forbidden` (bool[K] or a sequence of ids) to a host bool[K] mask.

  Raises:
    ValueError: if an id is outside [0, K), the mask has the wrong length, or
      every id is forbidden, which would leave nothing to draw.
  """
  if forbidden is None:
    return None
  try:
    values = np.asarray(forbidden)
  except jax.errors.TracerArrayConversionError as error:
    raise ValueError(
        '`forbidden` must be a concrete bool mask or list of ids, not a traced '
        'array; pass it as a static value.') from error

  if values.dtype == np.bool_:
    if values.shape != (num_classes,):
      raise ValueError(
          f'Boolean `forbidden` must have shape ({num_classes},), got {values.shape}.')
    mask = values.copy()
  else:
    ids = values.reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
      raise ValueError(
          f'Forbidden ids must lie in [0, {num_classes}); got {ids.tolist()}.')
    mask = np.zeros(num_classes, dtype=bool)
    mask[ids] = True

  if mask.all():
    raise ValueError(
        f'All {num_classes} token ids are forbidden, so there is nothing to sample.')
  return mask


def gumbel_argmax(log_probs,
                  gumbel,
                  *,
                  axis: int = -1,
                  temperature: float = 1.0,
                  forbidden: np.ndarray | Sequence[int] | None = None):
  """Returns argmax_k(log_probs_k / temperature + gumbel_k) as int32.

  Tokens excluded from the argmax: the forbidden ids, whatever their noise,
  and ids whose log-probability is -inf. Where a row has no id left after that
  (all allowed ids have probability 0), the fallback is the allowed id with
  the largest noise, a uniform draw among the allowed ids. A forbidden id is
  never returned.

  Args:
    log_probs: float[..., K] log-probabilities or logits, normalised or not.
    gumbel: float[..., K] noise, e.g. from `gumbel_noise`. Fixed noise gives a
      deterministic sampler.
    axis: the class axis.
    temperature: a positive scalar, Python or traced. It divides the
      log-probabilities, not the noise.
    forbidden: bool[K] mask or sequence of ids that must never be returned;
      a concrete value, not a traced array.
  """
  dtype = jnp.result_type(log_probs.dtype, gumbel.dtype)
  shape = jnp.broadcast_shapes(log_probs.shape, gumbel.shape)
  log_probs = jnp.broadcast_to(log_probs, shape)
  gumbel = jnp.broadcast_to(gumbel, shape)
  axis = axis % len(shape)
  num_classes = shape[axis]
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}.')

  # Broadcast the [K] mask along `axis`.
  mask = forbidden_mask(forbidden, num_classes)
  allowed = log_probs > -jnp.inf
  if mask is not None:
    mask_shape = [1] * len(shape)
    mask_shape[axis] = num_classes
    not_forbidden = jnp.asarray(~mask).reshape(mask_shape)
    allowed = allowed & not_forbidden
  else:
    not_forbidden = jnp.ones((), dtype=bool)

  # The Gumbel-max scores, with excluded ids at -inf whatever their noise.
  scores = log_probs.astype(dtype) / temperature + gumbel.astype(dtype)
  scores = jnp.where(allowed, scores, -jnp.inf)
  choice = jnp.argmax(scores, axis=axis)

  # Rows with no allowed id of positive probability: uniform among allowed ids.
  fallback = jnp.argmax(jnp.where(not_forbidden, gumbel.astype(dtype), -jnp.inf), axis=axis)
  has_candidate = jnp.any(allowed, axis=axis)
  return jnp.where(has_candidate, choice, fallback).astype(jnp.int32)


def sample_categorical(rng,
                       log_probs,
                       axis: int = -1,
                       forbidden: np.ndarray | Sequence[int] | None = None,
                       temperature: float = 1.0):
  """Draws one id per row from softmax(log_probs / temperature) along `axis`.

  Exact to the float32 resolution of the input (see the module docstring),
  computed in float64 when `jax_enable_x64` is on. Forbidden ids, and ids with
  log-probability -inf, are never drawn; see `gumbel_argmax` for the fallback
  of a row whose allowed ids all have probability 0.

  Returns:
    int32 array of the shape of `log_probs` without `axis`.
  """
  gumbel = gumbel_noise(rng, log_probs.shape, noise_dtype())
  return gumbel_argmax(log_probs, gumbel, axis=axis, temperature=temperature,
                       forbidden=forbidden)
