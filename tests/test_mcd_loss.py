"""Tests for the MCD loss, the SDTT-style target and loss, and distillation rounds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import schedules
from mcd_jax.distill import mcd
from mcd_jax.distill import rounds
from mcd_jax.distill import sdtt

K = 3
MASK = K


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _kl(log_p, log_q):
  return float(np.sum(np.exp(log_p) * (log_p - log_q)))


class TinyModel(nn.Module):
  """A small time-conditioned denoiser whose output depends on the whole sequence."""
  vocab_size: int = K

  @nn.compact
  def __call__(self, tokens, t, padding_mask=None, deterministic=True):
    del padding_mask, deterministic
    embedded = nn.Embed(self.vocab_size + 1, 8)(tokens)  # [B, L, 8]
    time_weight = self.param('time', nn.initializers.normal(1.0), (8,))
    hidden = jnp.tanh(embedded + embedded.mean(axis=1, keepdims=True)
                      + t[:, None, None] * time_weight)
    return nn.Dense(self.vocab_size)(hidden)


class FixedModel(nn.Module):
  """A parameter-free model: logits t·a + (number of unmasked tokens in the row)·b.

  Two calls at different times or with different numbers of unmasked tokens give
  different distributions, so a target shows which call produced it.
  """

  @nn.compact
  def __call__(self, tokens, t, padding_mask=None, deterministic=True):
    del padding_mask, deterministic
    a = jnp.array([0.0, 1.0, 2.0])
    b = jnp.array([0.0, 0.0, 3.0])
    unmasked = jnp.sum(tokens != MASK, axis=1).astype(jnp.float32)  # [B]
    logits = t[:, None] * a + unmasked[:, None] * b  # [B, K]
    return jnp.broadcast_to(logits[:, None, :], tokens.shape + (K,))


def _hand_case():
  """One sequence: position 0 revealed in z_s, 1 and 2 still masked, 3 unmasked in z_t."""
  rng = np.random.default_rng(0)
  student_logits = rng.normal(size=(1, 4, K)).astype(np.float32)
  teacher_log_probs = _log_softmax(rng.normal(size=(1, 4, K))).astype(np.float32)
  tokens = np.array([[0, 1, 2, 1]])
  z_t = np.array([[MASK, MASK, MASK, 1]])
  z_s = np.array([[0, MASK, MASK, 1]])
  return student_logits, teacher_log_probs, tokens, z_t, z_s


# ---- mcd_loss on hand-built cases ----


def test_mcd_loss_matches_hand_computation():
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()
  loss, metrics = mcd.mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, MASK)

  student = _log_softmax(student_logits[0])
  teacher = _log_softmax(teacher_log_probs[0])
  cross_entropy = -student[0, tokens[0, 0]]
  kl = _kl(student[1], teacher[1]) + _kl(student[2], teacher[2])
  np.testing.assert_allclose(metrics['ce_part'], cross_entropy / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl_part'], kl / 3, rtol=1e-5)
  np.testing.assert_allclose(loss, (cross_entropy + kl) / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics['revealed_fraction'], 1 / 3, rtol=1e-6)
  assert float(metrics['num_masked']) == 3.0


def test_mcd_loss_forward_kl_option():
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()
  _, metrics = mcd.mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, MASK,
                            divergence='forward_kl')

  student = _log_softmax(student_logits[0])
  teacher = _log_softmax(teacher_log_probs[0])
  kl = _kl(teacher[1], student[1]) + _kl(teacher[2], student[2])
  np.testing.assert_allclose(metrics['kl_part'], kl / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce_part'], -student[0, 0] / 3, rtol=1e-5)


def test_mcd_loss_rejects_unknown_divergence():
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()
  with pytest.raises(ValueError, match='divergence'):
    mcd.mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, MASK, divergence='js')


def test_mcd_loss_no_gradient_to_teacher_log_probs():
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()

  def loss_of(student, teacher):
    return mcd.mcd_loss(student, teacher, tokens, z_t, z_s, MASK)[0]

  student_grad, teacher_grad = jax.grad(loss_of, argnums=(0, 1))(
      jnp.asarray(student_logits), jnp.asarray(teacher_log_probs))
  assert np.all(np.asarray(teacher_grad) == 0.0)
  assert np.any(np.abs(np.asarray(student_grad)) > 1e-3)


@pytest.mark.parametrize('tiny_log_prob', [-1e30, -np.inf])
def test_mcd_loss_finite_with_zero_teacher_probability(tiny_log_prob):
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()
  teacher_log_probs = teacher_log_probs.copy()
  teacher_log_probs[0, 1, 0] = tiny_log_prob

  for divergence in mcd.DIVERGENCES:
    loss, metrics = mcd.mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, MASK,
                                 divergence=divergence)
    grad = jax.grad(lambda s: mcd.mcd_loss(s, teacher_log_probs, tokens, z_t, z_s, MASK,
                                           divergence=divergence)[0])(student_logits)
    assert np.isfinite(float(loss)), divergence
    assert np.isfinite(float(metrics['kl_part'])), divergence
    assert np.all(np.isfinite(np.asarray(grad))), divergence


def test_mcd_loss_ignores_padded_positions():
  student_logits, teacher_log_probs, tokens, z_t, z_s = _hand_case()
  padding_mask = np.array([[True, True, False, True]])
  loss, metrics = mcd.mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, MASK,
                               padding_mask=padding_mask)

  # Changing the padded position's logits must not change anything.
  changed = student_logits.copy()
  changed[0, 2] += np.array([5.0, -3.0, 1.0], np.float32)
  changed_loss, _ = mcd.mcd_loss(changed, teacher_log_probs, tokens, z_t, z_s, MASK,
                                 padding_mask=padding_mask)

  student = _log_softmax(student_logits[0])
  teacher = _log_softmax(teacher_log_probs[0])
  expected = (-student[0, 0] + _kl(student[1], teacher[1])) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics['num_masked']) == 2.0
  assert float(changed_loss) == float(loss)


# ---- mcd_step_loss with real models ----


def _models_and_batch(batch=4, length=6, seed=0):
  model = TinyModel()
  rng = jax.random.key(seed)
  student_rng, teacher_rng, token_rng, time_rng = jax.random.split(rng, 4)
  tokens = jax.random.randint(token_rng, (batch, length), 0, K)
  t0 = jnp.full((batch,), 0.5)
  student_params = model.init(student_rng, tokens, t0)['params']
  teacher_params = model.init(teacher_rng, tokens, t0)['params']
  masking_times = jax.random.uniform(time_rng, (batch, length))
  return model, student_params, teacher_params, tokens, masking_times


@pytest.mark.parametrize('source', mcd.TRAJECTORY_SOURCES)
def test_step_loss_no_gradient_to_teacher_params(source):
  model, student_params, teacher_params, tokens, masking_times = _models_and_batch()
  t = jnp.array([0.9, 0.7, 0.6, 1.0])
  gumbel = jax.random.gumbel(jax.random.key(3), tokens.shape + (K,))

  def loss_of(student, teacher):
    return mcd.mcd_step_loss(model, student, model, teacher, tokens, masking_times, t, 0.3,
                             MASK, trajectory_source=source, gumbel=gumbel)[0]

  student_grad, teacher_grad = jax.grad(loss_of, argnums=(0, 1))(student_params, teacher_params)
  teacher_leaves = jax.tree_util.tree_leaves(teacher_grad)
  student_leaves = jax.tree_util.tree_leaves(student_grad)
  assert all(np.all(np.asarray(leaf) == 0.0) for leaf in teacher_leaves)
  assert any(np.any(np.abs(np.asarray(leaf)) > 1e-6) for leaf in student_leaves)


def test_step_loss_zero_for_self_distillation():
  """Student = teacher and Δ = 0: z_s = z_t, so the loss and its gradient vanish."""
  model, params, _, tokens, masking_times = _models_and_batch()
  t = jnp.array([0.9, 0.7, 0.6, 1.0])

  def loss_of(student):
    return mcd.mcd_step_loss(model, student, model, params, tokens, masking_times, t, 0.0,
                             MASK)

  (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(params)
  assert float(metrics['num_masked']) > 0  # The check below must cover masked positions.
  assert float(metrics['ce_part']) == 0.0  # s = t reveals nothing.
  assert abs(float(metrics['kl_part'])) < 1e-6
  assert abs(float(loss)) < 1e-6
  # float32 rounding in the two log-softmaxes leaves gradients of order 1e-7.
  assert max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(grad)) < 1e-5


def test_step_loss_revealed_targets_by_source():
  """With the data trajectory the cross-entropy target is the data token; with the
  teacher trajectory it is the teacher's argmax (Gumbel noise set to 0)."""
  model = FixedModel()
  tokens = jnp.zeros((2, 5), jnp.int32)
  masking_times = jnp.array([[0.1, 0.5, 0.6, 0.8, 0.95], [0.55, 0.2, 0.9, 0.7, 0.3]])
  t = jnp.array([1.0, 1.0])
  zeros = jnp.zeros((2, 5, K))

  _, data_metrics = mcd.mcd_step_loss(model, {}, model, {}, tokens, masking_times, t, 0.5,
                                      MASK, trajectory_source='data')
  _, teacher_metrics = mcd.mcd_step_loss(model, {}, model, {}, tokens, masking_times, t, 0.5,
                                         MASK, trajectory_source='teacher', gumbel=zeros)

  # All 10 positions are masked at t = 1, and those with τ > 0.5 are revealed:
  # 3 in row 0 and 3 in row 1. The student's input z_t is fully masked at t = 1, so
  # its log-probabilities are log_softmax(a) = log_softmax([0, 1, 2]) everywhere.
  student = _log_softmax(np.array([0.0, 1.0, 2.0]))
  np.testing.assert_allclose(data_metrics['revealed_fraction'], 0.6, rtol=1e-6)
  np.testing.assert_allclose(data_metrics['ce_part'], -6 * student[0] / 10, rtol=1e-5)
  np.testing.assert_allclose(teacher_metrics['ce_part'], -6 * student[2] / 10, rtol=1e-5)


def test_step_loss_teacher_source_needs_gumbel():
  model, student_params, teacher_params, tokens, masking_times = _models_and_batch()
  with pytest.raises(ValueError, match='gumbel'):
    mcd.mcd_step_loss(model, student_params, model, teacher_params, tokens, masking_times,
                      jnp.ones(4), 0.25, MASK, trajectory_source='teacher')


def test_sample_distill_times_antithetic():
  delta = 0.25
  t = np.asarray(mcd.sample_distill_times(jax.random.key(0), 8, delta))
  assert t.shape == (8,)
  assert np.all(t >= delta)
  assert np.all(t <= 1.0)
  np.testing.assert_allclose(np.diff(np.sort(t)), (1.0 - delta) / 8, rtol=1e-4)


# ---- SDTT-style target and loss ----


def test_sdtt_target_all_revealed_in_first_step():
  """From t = Δ = 0.5 the first step ends at 0 and reveals every masked position."""
  z_t = jnp.array([[MASK, MASK, 2, MASK]])
  t = jnp.array([0.5])
  target = sdtt.sdtt_target(FixedModel(), {}, jax.random.key(0), z_t, t, 0.5, MASK,
                            schedules.linear())
  assert target.shape == (1, 4, K)
  # One unmasked token in z_t: logits 0.5·a + 1·b.
  expected = _log_softmax(0.5 * np.array([0.0, 1.0, 2.0]) + np.array([0.0, 0.0, 3.0]))
  for position in (0, 1, 3):
    np.testing.assert_allclose(target[0, position], expected, rtol=1e-5, atol=1e-6)


def test_sdtt_target_takes_revealing_step_distribution():
  """From a fully masked z_1 with Δ = 0.5, the first step reveals each position with
  probability 1/2 and the second reveals the rest. Positions revealed first carry
  the first step's output, log_softmax(a). Every other masked position carries the
  second step's output, log_softmax(0.5·a + n·b), with n the number revealed first
  in that row, so the two kinds of position are tied together row by row."""
  batch, length = 256, 8
  z_t = jnp.full((batch, length), MASK, jnp.int32)
  t = jnp.ones((batch,))
  target = np.asarray(sdtt.sdtt_target(FixedModel(), {}, jax.random.key(1), z_t, t, 0.5,
                                       MASK, schedules.linear()))
  assert target.shape == (batch, length, K)

  a = np.array([0.0, 1.0, 2.0])
  b = np.array([0.0, 0.0, 3.0])
  first = np.all(np.abs(target - _log_softmax(a)) < 1e-5, axis=-1)  # [B, L]
  first_counts = first.sum(axis=1)
  for row in range(batch):
    second = _log_softmax(0.5 * a + first_counts[row] * b)
    others = target[row][~first[row]]
    np.testing.assert_allclose(others, np.broadcast_to(second, others.shape), atol=1e-5)

  # Each position is revealed first with probability 1/2; the standard error of
  # the mean over 2048 positions is sqrt(0.25 / 2048) ≈ 0.011, so allow 5 of them.
  assert abs(first.mean() - 0.5) < 5 * np.sqrt(0.25 / first.size)


def test_sdtt_loss_divergences():
  student_logits, teacher_log_probs, _, z_t, _ = _hand_case()
  student = _log_softmax(student_logits[0])
  target = _log_softmax(teacher_log_probs[0])

  reverse, _ = sdtt.sdtt_loss(student_logits, teacher_log_probs, z_t, MASK)
  forward, metrics = sdtt.sdtt_loss(student_logits, teacher_log_probs, z_t, MASK,
                                    divergence='forward_kl')
  np.testing.assert_allclose(reverse, np.mean([_kl(student[i], target[i]) for i in range(3)]),
                             rtol=1e-5)
  np.testing.assert_allclose(forward, np.mean([_kl(target[i], student[i]) for i in range(3)]),
                             rtol=1e-5)
  assert float(metrics['num_masked']) == 3.0


def test_sdtt_loss_no_gradient_to_target():
  student_logits, teacher_log_probs, _, z_t, _ = _hand_case()
  grad = jax.grad(lambda target: sdtt.sdtt_loss(student_logits, target, z_t, MASK)[0])(
      jnp.asarray(teacher_log_probs))
  assert np.all(np.asarray(grad) == 0.0)


# ---- Distillation rounds ----


def test_rounds_delta_and_student_steps():
  schedule = rounds.RoundSchedule(base_steps=1024, num_rounds=6, steps_per_round=100)
  assert schedule.delta(0) == 1 / 1024
  assert schedule.delta(5) == 32 / 1024
  assert schedule.student_delta(5) == 64 / 1024
  assert schedule.student_steps_after(6) == 16
  assert schedule.student_steps_after(0) == 1024
  assert rounds.student_steps_after(6, 1024) == 16
  assert rounds.delta_for_round(3, 64) == 8 / 64


def test_rounds_round_for_step():
  schedule = rounds.RoundSchedule(base_steps=16, num_rounds=2, steps_per_round=10)
  assert schedule.round_for_step(0) == (0, 0)
  assert schedule.round_for_step(9) == (0, 9)
  assert schedule.round_for_step(10) == (1, 0)
  assert schedule.round_for_step(19) == (1, 9)
  with pytest.raises(ValueError, match='outside'):
    schedule.round_for_step(20)
  with pytest.raises(ValueError, match='outside'):
    schedule.round_for_step(-1)


@pytest.mark.parametrize('base_steps, num_rounds, steps_per_round, message', [
    (1000, 4, 10, 'divisible'),
    (1024, -1, 10, 'num_rounds'),
    (0, 1, 10, 'base_steps'),
    (1024, 2, 0, 'steps_per_round'),
])
def test_rounds_validation(base_steps, num_rounds, steps_per_round, message):
  with pytest.raises(ValueError, match=message):
    rounds.RoundSchedule(base_steps, num_rounds, steps_per_round)


def test_rounds_delta_validation():
  with pytest.raises(ValueError, match='student step'):
    rounds.delta_for_round(4, 16)  # 2Δ = 32 / 16 > 1.
  with pytest.raises(ValueError, match='round_index'):
    rounds.RoundSchedule(16, 2, 10).delta(2)
