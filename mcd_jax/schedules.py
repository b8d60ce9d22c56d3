"""Masking schedules α_t for masked diffusion.

Time runs from t = 0 (clean data) to t = 1 (fully masked). A schedule gives the
keep probability α_t, its time derivative α'_t, and the inverse map α ↦ t that
turns a per-position uniform draw into a masking time.
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

# Smallest 1 - α_t used in the ELBO weight α'_t / (1 - α_t), so that the weight
# stays finite at t = 0, where no position is masked and the weighted sum is 0.
MIN_MASK_PROBABILITY = 1e-6


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A keep-probability schedule α_t with its derivative and inverse."""

  name: str
  alpha: Callable[[jnp.ndarray], jnp.ndarray]
  alpha_derivative: Callable[[jnp.ndarray], jnp.ndarray]
  inverse: Callable[[jnp.ndarray], jnp.ndarray]

  def elbo_weight(self, t):
    """Returns -α'_t / (1 - α_t) >= 0, the continuous-time ELBO weight."""
    mask_probability = jnp.maximum(1.0 - self.alpha(t), MIN_MASK_PROBABILITY)
    return -self.alpha_derivative(t) / mask_probability

  def masking_time(self, uniform):
    """Maps U ~ U(0, 1) to the time τ = α^{-1}(U) at which a position is masked.

    A position with draw U is kept at time t iff α_t > U. Times are clipped to
    [0, 1], so a schedule with α_1 > 0 (log-linear) masks every position at t = 1,
    where samplers start.
    """
    return jnp.clip(self.inverse(uniform), 0.0, 1.0)


def linear():
  return Schedule(
      name='linear',
      alpha=lambda t: 1.0 - t,
      alpha_derivative=lambda t: -jnp.ones_like(t),
      inverse=lambda a: 1.0 - a,
  )


def cosine():
  half_pi = math.pi / 2
  return Schedule(
      name='cosine',
      alpha=lambda t: jnp.cos(half_pi * t),
      alpha_derivative=lambda t: -half_pi * jnp.sin(half_pi * t),
      inverse=lambda a: jnp.arccos(jnp.clip(a, -1.0, 1.0)) / half_pi,
  )


def loglinear(eps_min: float = 1e-3):
  """α_t = 1 - (1 - ε_min) t, the MDLM schedule: σ_t = -log α_t is log-linear."""
  slope = 1.0 - eps_min
  return Schedule(
      name='loglinear',
      alpha=lambda t: 1.0 - slope * t,
      alpha_derivative=lambda t: -slope * jnp.ones_like(t),
      inverse=lambda a: (1.0 - a) / slope,
  )


SCHEDULES = {'linear': linear, 'cosine': cosine, 'loglinear': loglinear}


def get_schedule(name: str) -> Schedule:
  """Returns the schedule called `name`; raises ValueError for an unknown name."""
  if name not in SCHEDULES:
    raise ValueError(
        f'Unknown masking schedule {name!r}. Choose one of {sorted(SCHEDULES)}.')
  return SCHEDULES[name]()
