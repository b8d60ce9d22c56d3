"""Tests for mcd_jax.schedules: α_t, α'_t, the inverse t(α) and the ELBO weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import schedules

SCHEDULE_NAMES = sorted(schedules.SCHEDULES)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_alpha_is_one_at_time_zero(name):
  schedule = schedules.get_schedule(name)
  assert float(schedule.alpha(jnp.float32(0.0))) == 1.0


def test_alpha_at_time_one():
  # Linear and cosine mask everything at t = 1, log-linear keeps ε_min.
  assert abs(float(schedules.linear().alpha(jnp.float32(1.0)))) < 1e-7
  assert abs(float(schedules.cosine().alpha(jnp.float32(1.0)))) < 1e-7
  loglinear = schedules.loglinear(eps_min=1e-3)
  assert abs(float(loglinear.alpha(jnp.float32(1.0))) - 1e-3) < 1e-7


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_alpha_is_decreasing(name):
  schedule = schedules.get_schedule(name)
  alpha = np.asarray(schedule.alpha(jnp.linspace(0.0, 1.0, 1001)))
  assert np.all(np.diff(alpha) < 0)
  assert np.all((alpha >= -1e-7) & (alpha <= 1.0))


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_derivative_matches_finite_difference(name):
  schedule = schedules.get_schedule(name)
  step = 1e-3
  t = np.linspace(step, 1.0 - step, 99)

  # Central differences in float64 numpy via float32 α: the truncation error is
  # O(step²) and the rounding error about 6e-8 / step, both below 1e-4.
  alpha_plus = np.asarray(schedule.alpha(jnp.asarray(t + step, jnp.float32)),
                          np.float64)
  alpha_minus = np.asarray(schedule.alpha(jnp.asarray(t - step, jnp.float32)),
                           np.float64)
  finite_difference = (alpha_plus - alpha_minus) / (2 * step)
  derivative = np.asarray(schedule.alpha_derivative(jnp.asarray(t, jnp.float32)))
  np.testing.assert_allclose(derivative, finite_difference, atol=2e-4)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_derivative_matches_autodiff(name):
  schedule = schedules.get_schedule(name)
  t = jnp.linspace(0.0, 1.0, 51)
  autodiff = jax.vmap(jax.grad(schedule.alpha))(t)
  np.testing.assert_allclose(schedule.alpha_derivative(t), autodiff,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_inverse_round_trip(name):
  schedule = schedules.get_schedule(name)
  t = jnp.linspace(0.0, 1.0, 1001)
  recovered = schedule.inverse(schedule.alpha(t))
  # arccos loses precision near α = 1 (t near 0): |dt/dα| grows as 1/sin.
  np.testing.assert_allclose(recovered, t, atol=1e-3)

  alpha = jnp.linspace(0.01, 1.0, 100)
  np.testing.assert_allclose(schedule.alpha(schedule.inverse(alpha)), alpha,
                             atol=1e-6)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_masking_time_is_clipped_to_unit_interval(name):
  schedule = schedules.get_schedule(name)
  uniform = jnp.array([0.0, 1e-6, 0.25, 0.5, 0.999999, 1.0])
  times = np.asarray(schedule.masking_time(uniform))
  assert np.all((times >= 0.0) & (times <= 1.0))
  assert np.all(np.diff(times) <= 0)
  assert times[0] == 1.0
  assert times[-1] == 0.0


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_masking_time_keeps_iff_alpha_above_uniform(name):
  schedule = schedules.get_schedule(name)
  uniform = jnp.linspace(0.02, 0.98, 49)
  times = schedule.masking_time(uniform)

  # Just before τ the position is kept (α > U), just after it is masked.
  before = np.asarray(schedule.alpha(times - 1e-3))
  after = np.asarray(schedule.alpha(times + 1e-3))
  assert np.all(before > np.asarray(uniform))
  assert np.all(after < np.asarray(uniform))


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_elbo_weight_finite_at_ends(name):
  schedule = schedules.get_schedule(name)
  weights = np.asarray(schedule.elbo_weight(jnp.array([0.0, 0.5, 1.0])))
  assert np.all(np.isfinite(weights))
  assert np.all(weights >= 0.0)


def test_elbo_weight_linear_is_one_over_t():
  schedule = schedules.linear()
  t = jnp.array([0.1, 0.5, 1.0])
  np.testing.assert_allclose(schedule.elbo_weight(t), 1.0 / t, rtol=1e-5)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match='Unknown masking schedule'):
    schedules.get_schedule('sigmoid')
