"""The Gaussian–masked duality: masked diffusion as a projected Gaussian process.

A position with clean token x in {0, …, K-1} carries the Gaussian latent
w_t = γ_t e_x + ε, ε ~ N(0, I_K), with γ_t decreasing from +∞ at t = 0 to -∞
at t = 1. Projecting w_t to x when w_t[x] is the unique maximum, and to the
mask token otherwise, gives the masked-diffusion forward process with keep
probability α_t = A_K(γ_t), where

    A_K(γ) = ∫ φ(u) Φ(u + γ)^{K-1} du.

With ε fixed, x is kept iff γ_t > g, g = max_{j≠x} ε_j - ε_x (the masking gap).
So every position has one masking time, and the masked set only grows with t.
A_K is the CDF of g, and g has the same law for every x: g = M - N with M the
maximum of K-1 standard normals and N ~ N(0, 1). `sample_masking_gap` draws it
at O(1) cost per position, and the masking time τ = α^{-1}(A_K(g)) gives a
whole deterministic trajectory without materialising the [..., K] latent.

A_K is tabulated once per K in float64 numpy (cached, so importing this module
creates no JAX array) and interpolated linearly inside jit. K (`vocab_size`)
is always a static Python int.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import signal
from scipy import special

from mcd_jax import schedules

# Step of the γ grid of the A_K table. Linear interpolation is off by at most
# h² / 8 · max|A_K''|, and A_K'' = f_M ⋆ φ' is bounded by max|φ'| = φ(1) ≈ 0.242
# because A_K' is the density of M - N. With h = 2^-10 the bound is 2.9e-8.
# A power of two keeps γ / h exact in floating point, so the table index and
# the interpolation weight carry no rounding error.
TABLE_STEPS_PER_UNIT = 1024

# Lower end of the table. A_K(γ) <= A_2(γ) = Φ(γ / √2), and Φ(-10 / √2) < 1e-12,
# so clamping below this point changes A_K by less than 1e-12.
TABLE_GAMMA_MIN = -10.0

# The upper end is this margin plus ⌈√(2 log K)⌉, the scale of M. There
# 1 - A_K(γ) = P(M - N > γ) <= (K - 1)(1 - Φ(γ / √2)) < 1e-16 for every K >= 2.
TABLE_GAMMA_MARGIN = 10.0

# Half-width of the Gaussian kernel in the quadrature: φ(9) < 1e-17.
KERNEL_HALF_WIDTH = 9.0

# Table values within this distance of 0 or 1 are set to exactly 0 or 1, which
# removes the round-off of the FFT convolution (about 1e-16) from the tails.
TABLE_NOISE_FLOOR = 1e-14


def _check_vocab_size(vocab_size):
  if isinstance(vocab_size, jax.core.Tracer):
    raise TypeError(
        'vocab_size must be a static Python int, but a traced value was '
        'passed. Mark it static, e.g. jax.jit(f, static_argnames="vocab_size").')
  if int(vocab_size) != vocab_size or vocab_size < 2:
    raise ValueError(f'vocab_size must be an integer >= 2, got {vocab_size!r}.')
  return int(vocab_size)


@functools.lru_cache(maxsize=32)
def keep_probability_table(vocab_size: int):
  """Tabulates A_K on a uniform γ grid in float64.

  A_K(γ) = ∫ φ(γ - v) Φ(v)^{K-1} dv is a convolution of φ with the CDF of the
  maximum of K-1 standard normals. It is evaluated by the trapezoidal rule on
  the grid itself (exponentially accurate for these smooth, fast-decaying
  integrands) with an FFT convolution, and Φ^{K-1} as exp((K-1) log Φ).

  Args:
    vocab_size: K >= 2.

  Returns:
    (gamma_grid, alpha_table): read-only float64 arrays of equal length, gamma
    from TABLE_GAMMA_MIN in steps of 1 / TABLE_STEPS_PER_UNIT and alpha
    non-decreasing from about 0 to 1.
  """
  vocab_size = _check_vocab_size(vocab_size)
  step = 1.0 / TABLE_STEPS_PER_UNIT

  gamma_max = TABLE_GAMMA_MARGIN + math.ceil(math.sqrt(2 * math.log(vocab_size)))
  num_points = int(round((gamma_max - TABLE_GAMMA_MIN) * TABLE_STEPS_PER_UNIT)) + 1
  gamma_grid = TABLE_GAMMA_MIN + step * np.arange(num_points)

  # The integration grid extends the γ grid by the kernel half-width each side.
  half_width_points = int(KERNEL_HALF_WIDTH * TABLE_STEPS_PER_UNIT)
  offsets = step * np.arange(-half_width_points, half_width_points + 1)
  kernel = step * np.exp(-0.5 * offsets**2) / math.sqrt(2 * math.pi)
  v = gamma_grid[0] + step * np.arange(
      -half_width_points, num_points + half_width_points)
  max_cdf = np.exp((vocab_size - 1) * special.log_ndtr(v))  # Φ(v)^{K-1}

  alpha = signal.fftconvolve(max_cdf, kernel, mode='valid')  # [num_points]

  alpha = np.clip(alpha, 0.0, 1.0)
  alpha[alpha < TABLE_NOISE_FLOOR] = 0.0
  alpha[alpha > 1.0 - TABLE_NOISE_FLOOR] = 1.0
  alpha = np.maximum.accumulate(alpha)

  gamma_grid.setflags(write=False)
  alpha.setflags(write=False)
  return gamma_grid, alpha


@functools.lru_cache(maxsize=32)
def _inverse_table(vocab_size: int):
  """Returns the strictly increasing part of the table, with one flat point each side."""
  gamma_grid, alpha = keep_probability_table(vocab_size)
  first = max(int(np.searchsorted(alpha, 0.0, side='right')) - 1, 0)
  last = min(int(np.searchsorted(alpha, 1.0, side='left')), len(alpha) - 1)
  alpha_part = alpha[first:last + 1].copy()
  gamma_part = gamma_grid[first:last + 1].copy()
  alpha_part.setflags(write=False)
  gamma_part.setflags(write=False)
  return alpha_part, gamma_part


def _float_dtype(x):
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def keep_probability(gamma, vocab_size: int):
  """Computes α = A_K(γ) = ∫ φ(u) Φ(u + γ)^{K-1} du elementwise.

  Monotone non-decreasing in γ, with A_K(0) = 1/K. The absolute error is below
  1e-7 in float64 (the interpolation bound is 2.9e-8) and below 1e-6 in float32
  (about 1e-7 measured for K from 2 to 262,144). γ = -inf gives 0, γ = +inf
  gives 1, and NaN stays NaN.

  Args:
    gamma: float array of any shape (float64 is kept when x64 is enabled).
    vocab_size: K >= 2, a static Python int.

  Returns:
    Array of gamma's shape and float dtype.
  """
  vocab_size = _check_vocab_size(vocab_size)
  _, alpha_table = keep_probability_table(vocab_size)
  dtype = _float_dtype(gamma)
  return _interpolate_table(jnp.asarray(gamma, dtype),
                            jnp.asarray(alpha_table, dtype))


@jax.jit
def _interpolate_table(gamma, table):
  """Interpolates the A_K table (starting at TABLE_GAMMA_MIN) linearly at γ."""
  num_points = table.shape[0]
  first_index = round(TABLE_GAMMA_MIN * TABLE_STEPS_PER_UNIT)
  last_gamma = TABLE_GAMMA_MIN + (num_points - 1) / TABLE_STEPS_PER_UNIT

  # γ · 1024 and its floor are exact, so index and weight have no rounding error.
  clipped = jnp.clip(gamma, TABLE_GAMMA_MIN, last_gamma)
  scaled = clipped * TABLE_STEPS_PER_UNIT
  floor = jnp.floor(scaled)
  index = jnp.clip(floor.astype(jnp.int32) - first_index, 0, num_points - 2)
  weight = scaled - (index + first_index).astype(gamma.dtype)

  alpha = table[index] + weight * (table[index + 1] - table[index])
  return jnp.where(jnp.isnan(gamma), jnp.nan, alpha)


def gamma_from_alpha(alpha, vocab_size: int):
  """Computes γ = A_K^{-1}(α) elementwise, the γ_t that gives keep probability α_t.

  Inverts the same piecewise-linear table as `keep_probability`, so
  keep_probability(gamma_from_alpha(α)) = α up to rounding. The result is
  monotone non-decreasing in α and finite. α <= 0 returns the largest grid
  point where the table is 0, and α >= 1 the smallest where it is 1, after
  values within 1e-14 of 0 or 1 were set to 0 or 1. For K from 2 to 262,144
  these ends lie in [-10, -3.2] and [10.8, 12.9].

  Args:
    alpha: float array of any shape.
    vocab_size: K >= 2, a static Python int.

  Returns:
    Array of alpha's shape and float dtype.
  """
  vocab_size = _check_vocab_size(vocab_size)
  alpha_part, gamma_part = _inverse_table(vocab_size)
  dtype = _float_dtype(alpha)
  alpha = jnp.asarray(alpha, dtype)
  return jnp.interp(alpha, jnp.asarray(alpha_part, dtype),
                    jnp.asarray(gamma_part, dtype))


def gaussian_latent(noise, tokens, gamma):
  """Builds the latent w = γ e_x + ε.

  Args:
    noise: float[..., K], the standard normal ε.
    tokens: int[...], clean tokens x in [0, K).
    gamma: float broadcastable to tokens' shape; ±inf is allowed.

  Returns:
    float[..., K]. Only coordinate x is shifted, so γ = ±inf gives ±inf there
    and leaves the other coordinates finite.
  """
  vocab_size = noise.shape[-1]
  is_token = tokens[..., None] == jnp.arange(vocab_size)  # [..., K]
  shift = jnp.broadcast_to(jnp.asarray(gamma, noise.dtype), tokens.shape)
  return noise + jnp.where(is_token, shift[..., None], 0.0)


def _other_coordinates_max(values, tokens):
  """Computes max_{j ≠ x} values[..., j] and values[..., x]."""
  vocab_size = values.shape[-1]
  is_token = tokens[..., None] == jnp.arange(vocab_size)  # [..., K]
  token_value = jnp.take_along_axis(values, tokens[..., None], axis=-1)[..., 0]
  others_max = jnp.max(jnp.where(is_token, -jnp.inf, values), axis=-1)
  return others_max, token_value


def project(latent, tokens, mask_id: int):
  """Projects a Gaussian latent to a masked sequence (max-value index preservation).

  Args:
    latent: float[..., K].
    tokens: int[...], clean tokens x in [0, K).
    mask_id: the mask token id, K in this project.

  Returns:
    int[...]: x where latent[..., x] is strictly larger than every other
    coordinate, mask_id otherwise (a tie masks).
  """
  others_max, token_value = _other_coordinates_max(latent, tokens)
  return jnp.where(token_value > others_max, tokens, mask_id).astype(tokens.dtype)


def masking_gap_from_noise(noise, tokens):
  """Computes the masking gap g = max_{j≠x} ε_j - ε_x from the full noise.

  The position is kept at γ iff γ > g (up to float rounding of γ + ε_x).

  Args:
    noise: float[..., K].
    tokens: int[...], clean tokens x in [0, K).

  Returns:
    float[...].
  """
  others_max, token_value = _other_coordinates_max(noise, tokens)
  return others_max - token_value


def _max_of_normals(uniform, num_normals: int):
  """Maps U ~ U(0, 1] to M = Φ^{-1}(U^{1/n}), the maximum of n standard normals.

  U^{1/n} rounds to 1 in float32 for large n and Φ^{-1}(1) = inf, so the power
  is taken in log space. Φ^{-1} is applied to p = U^{1/n} when p < 1/2 and as
  -Φ^{-1}(1 - p) otherwise, with 1 - p = -expm1(log U / n), which keeps full
  relative precision in both tails.
  """
  log_p = jnp.log(uniform) / num_normals
  p = jnp.exp(log_p)
  tiny = jnp.finfo(uniform.dtype).tiny
  one_minus_p = jnp.maximum(-jnp.expm1(log_p), tiny)
  lower = jax.scipy.special.ndtri(jnp.minimum(p, 0.5))
  upper = -jax.scipy.special.ndtri(jnp.minimum(one_minus_p, 0.5))
  return jnp.where(p < 0.5, lower, upper)


def sample_masking_gap(rng, shape, vocab_size: int, dtype=jnp.float32):
  """Draws masking gaps g = M - N with the law of max_{j≠x} ε_j - ε_x.

  M, the maximum of K-1 standard normals, is drawn by inversion from one
  uniform and N ~ N(0, 1), so the cost is O(1) per position for any K.
  For K = 2, M is a single standard normal.

  Args:
    rng: a jax.random key.
    shape: output shape, e.g. (B, L).
    vocab_size: K >= 2, a static Python int.
    dtype: float dtype of the result.

  Returns:
    float[shape], finite.
  """
  vocab_size = _check_vocab_size(vocab_size)
  return _sample_masking_gap(rng, tuple(shape), vocab_size, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _sample_masking_gap(rng, shape, vocab_size, dtype):
  max_rng, normal_rng = jax.random.split(rng)

  if vocab_size == 2:
    other_max = jax.random.normal(max_rng, shape, dtype)
  else:
    # NOTE: jax.random.uniform has 23 random bits in float32, so M is
    # discretised in its extreme upper tail (the top 2^-23 of U).
    uniform = jax.random.uniform(
        max_rng, shape, dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)
    other_max = _max_of_normals(uniform, vocab_size - 1)

  token_noise = jax.random.normal(normal_rng, shape, dtype)
  return other_max - token_noise


def masking_uniform(gap, vocab_size: int):
  """Maps masking gaps to A_K(g), which is U(0, 1) in law because A_K is g's CDF."""
  return keep_probability(gap, vocab_size)


def masking_times_from_uniform(uniform, schedule: schedules.Schedule):
  """Maps U ~ U(0, 1) to masking times τ = α^{-1}(U) in [0, 1]."""
  return schedule.masking_time(uniform)


def masking_times(rng, shape, schedule: schedules.Schedule, vocab_size: int):
  """Draws per-position masking times τ = α^{-1}(A_K(g)) through the masking gap.

  A position is masked at time t iff t >= τ. Under the linear schedule τ is
  U(0, 1).

  Args:
    rng: a jax.random key.
    shape: output shape, e.g. (B, L).
    schedule: the masking schedule α_t (static under jit).
    vocab_size: K >= 2, a static Python int.

  Returns:
    float32[shape] in [0, 1].
  """
  gap = sample_masking_gap(rng, shape, vocab_size)
  return masking_times_from_uniform(masking_uniform(gap, vocab_size), schedule)


def mask_at(tokens, masking_times, t, mask_id: int):
  """Computes z_t: mask_id where t >= τ, the clean token elsewhere.

  Args:
    tokens: int[B, L].
    masking_times: float[B, L], τ.
    t: float scalar or float[B], one time per batch row.
    mask_id: the mask token id.

  Returns:
    int[B, L].
  """
  t = jnp.asarray(t)
  t = jnp.reshape(t, t.shape + (1,) * (masking_times.ndim - t.ndim))
  return jnp.where(t >= masking_times, mask_id, tokens).astype(tokens.dtype)


def coupled_pair(tokens, masking_times, t, s, mask_id: int):
  """Builds (z_t, z_s) on one deterministic trajectory.

  For s <= t (elementwise per row) z_s reveals a superset of the positions z_t
  reveals, because both come from the same masking times. The order is not
  checked, because s and t are traced values under jit.

  Args:
    tokens: int[B, L].
    masking_times: float[B, L].
    t: float scalar or float[B], the later time.
    s: float scalar or float[B], the earlier time.
    mask_id: the mask token id.

  Returns:
    (z_t, z_s), both int[B, L].
  """
  z_t = mask_at(tokens, masking_times, t, mask_id)
  z_s = mask_at(tokens, masking_times, s, mask_id)
  return z_t, z_s
