"""The SDTT-style stochastic distillation baseline (self-distillation through time).

The target for the student at (z_t, t) comes from two ancestral teacher steps of
size Δ with fresh randomness, t -> t - Δ -> t - 2Δ. A position revealed during
those steps takes the teacher's distribution at the step that revealed it. A
position still masked after both steps takes the last step's distribution.

Divergence. The reference implementation, jdeschena/sdtt, selects its loss with
`distill_mode` and its shipped config (configs/parameterization/multi-round-sdtt.yaml)
sets `kl-bwd`, which calls torch's `F.kl_div(target, preds, log_target=True)`.
That computes Σ p_student (log p_student - log p_target) = KL(student ‖ target),
so the default here is 'reverse_kl' too. Its `kl-fwd` mode, KL(target ‖ student),
is 'forward_kl' here.
"""

import jax
import jax.numpy as jnp

from mcd_jax import schedules
from mcd_jax.distill import mcd

# Smallest 1 - α_t in the reveal probability (α_s - α_t) / (1 - α_t), so a step
# that starts at t = 0, where nothing is masked, stays finite.
_MIN_MASK_PROBABILITY = 1e-12


def reveal_probability(schedule: schedules.Schedule, t, s):
  """Returns (α_s - α_t) / (1 - α_t), the chance a masked position is revealed from t to s."""
  alpha_t = schedule.alpha(t)
  alpha_s = schedule.alpha(s)
  probability = (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, _MIN_MASK_PROBABILITY)
  return jnp.clip(probability, 0.0, 1.0)


def _ancestral_step(teacher_model, teacher_params, rng, z, t, s, mask_id, schedule,
                    padding_mask):
  """One ancestral teacher step from t to s; returns (z_s, teacher log-probs at (z, t), revealed).

  NOTE: tokens are drawn with jax.random.categorical, whose float32 Gumbel noise
  never draws a token more than about 16.6 nats below the most likely one. That
  only changes which tokens the target conditions on, never the target's values.
  """
  reveal_rng, token_rng = jax.random.split(rng)
  logits = mcd._apply(teacher_model, teacher_params, z, t, padding_mask)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, K]

  probability = reveal_probability(schedule, t, s)[:, None]  # [B, 1]
  revealed = (z == mask_id) & (jax.random.uniform(reveal_rng, z.shape) < probability)
  tokens = jax.random.categorical(token_rng, log_probs, axis=-1).astype(z.dtype)
  return jnp.where(revealed, tokens, z), log_probs, revealed


def sdtt_target(teacher_model, teacher_params, rng, z_t, t, delta, mask_id,
                schedule: schedules.Schedule, padding_mask=None):
  """Computes the SDTT target log-probabilities for the student at (z_t, t).

  Args:
    teacher_model: a Linen module returning float[B, L, K] logits (static).
    teacher_params: the frozen teacher's parameters.
    rng: a key for the two steps' reveals and token draws.
    z_t: int[B, L] with `mask_id` at masked positions.
    t: float[B]; delta: the teacher's step size Δ. The step times are clipped
      at 0, where every remaining position is revealed.
    mask_id: the mask token id K.
    schedule: the masking schedule that sets the reveal probabilities.
    padding_mask: optional bool[B, L], passed to the teacher.

  Returns:
    float32[B, L, K] log-probabilities under stop_gradient. At positions
    unmasked in z_t they are the last step's output, which the loss ignores.
  """
  first_rng, second_rng = jax.random.split(rng)
  t_middle = jnp.maximum(t - delta, 0.0)
  t_end = jnp.maximum(t - 2.0 * delta, 0.0)

  z_middle, first_log_probs, first_revealed = _ancestral_step(
      teacher_model, teacher_params, first_rng, z_t, t, t_middle, mask_id, schedule,
      padding_mask)
  # The second step's draws are not needed: only its distribution enters the target.
  _, second_log_probs, _ = _ancestral_step(
      teacher_model, teacher_params, second_rng, z_middle, t_middle, t_end, mask_id,
      schedule, padding_mask)

  # Positions revealed in the first step keep that step's distribution; those
  # revealed in the second step or never revealed take the second step's.
  target = jnp.where(first_revealed[..., None], first_log_probs, second_log_probs)
  return jax.lax.stop_gradient(target)


def sdtt_loss(student_logits, target_log_probs, z_t, mask_id, divergence='reverse_kl',
              padding_mask=None, log_prob_floor=-30.0):
  """Computes the mean KL between student and SDTT target over positions masked in z_t.

  Args:
    student_logits: float[B, L, K], the student's logits at (z_t, t).
    target_log_probs: float[B, L, K] from `sdtt_target`; floored at
      `log_prob_floor`, renormalised and put under stop_gradient.
    z_t: int[B, L]; mask_id: the mask token id K.
    divergence: 'reverse_kl', KL(student ‖ target), the default of the SDTT
      reference code, or 'forward_kl', KL(target ‖ student).
    padding_mask: optional bool[B, L], True at real tokens.

  Returns:
    (loss, metrics) with metrics 'loss', 'kl_part' and 'num_masked'.
  """
  masked = z_t == mask_id
  if padding_mask is not None:
    masked = masked & padding_mask.astype(bool)

  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  target = jax.lax.stop_gradient(
      mcd.floored_log_probs(target_log_probs.astype(jnp.float32), log_prob_floor))
  kl = mcd.distillation_kl(student_log_probs, target, divergence)
  kl = jnp.where(masked, kl, 0.0)

  num_masked = jnp.sum(masked)
  loss = jnp.sum(kl) / jnp.maximum(num_masked, 1).astype(jnp.float32)
  metrics = {'loss': loss, 'kl_part': loss, 'num_masked': num_masked.astype(jnp.float32)}
  return loss, metrics
