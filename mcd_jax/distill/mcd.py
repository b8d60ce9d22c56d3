"""Masked Consistency Distillation (MCD): the loss and one training step.

Every position i of a sequence has a masking time τ_i and is masked at time t iff
t >= τ_i, so any two times s < t give a coupled pair (z_t, z_s) on one trajectory,
with z_s revealing a superset of z_t. The student at (z_t, t) is trained towards
the frozen teacher at (z_s, s), s = t - Δ, on the positions masked in z_t:

  revealed in z_s:      cross-entropy  -log x_θ(z_t, t)_x  on the revealed token x;
  still masked in z_s:  KL(x_θ(z_t, t) ‖ x_φ(z_s, s))  over the K real tokens.

Why the reverse KL. When the teacher is the exact posterior and z_s comes from
the data, the mean of the teacher's predictions at z_s over the coupling equals
its prediction at z_t (tower property). The forward-KL optimum is that mean, so
forward-KL distillation returns the teacher unchanged. The reverse-KL optimum is
the normalised geometric mean of the teacher's predictions at z_s. It
down-weights the tokens that become implausible once a plausible neighbour is
revealed, and those tokens are what makes independent parallel reveals
incoherent. The forward KL is kept as an ablation.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcd_jax import diffusion
from mcd_jax import duality

DIVERGENCES = ('reverse_kl', 'forward_kl')
TRAJECTORY_SOURCES = ('data', 'teacher')


def _check_divergence(divergence: str) -> None:
  if divergence not in DIVERGENCES:
    raise ValueError(
        f'Invalid divergence {divergence!r}. Choose one of {list(DIVERGENCES)}.')


def _apply(model, params, tokens, t, padding_mask):
  """Calls the model, passing `padding_mask` only when one is given."""
  if padding_mask is None:
    return model.apply({'params': params}, tokens, t, deterministic=True)
  return model.apply({'params': params}, tokens, t, padding_mask=padding_mask,
                     deterministic=True)


def floored_log_probs(log_probs, log_prob_floor):
  """Floors log-probabilities at `log_prob_floor`, then renormalises over K.

  The floor keeps a KL finite where a probability is zero or underflows (-inf,
  -1e30). Renormalising keeps the result a distribution, so a KL against it
  stays >= 0 and is 0 when the two distributions agree.
  """
  return jax.nn.log_softmax(jnp.maximum(log_probs, log_prob_floor), axis=-1)


def kl_divergence(log_p, log_q):
  """KL(p ‖ q) over the last axis from log-probabilities; float[..., K] -> float[...]."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_kl(student_log_probs, target_log_probs, divergence):
  """Per-position KL between the student and a target, in the chosen direction.

  'reverse_kl' is KL(student ‖ target) and 'forward_kl' is KL(target ‖ student).
  """
  _check_divergence(divergence)
  if divergence == 'reverse_kl':
    return kl_divergence(student_log_probs, target_log_probs)
  return kl_divergence(target_log_probs, student_log_probs)


def mcd_loss(student_logits, teacher_log_probs, tokens, z_t, z_s, mask_id,
             divergence='reverse_kl', log_prob_floor=-30.0, padding_mask=None):
  """Computes the MCD loss on the positions masked in z_t.

  Args:
    student_logits: float[B, L, K], the student's logits at (z_t, t).
    teacher_log_probs: float[B, L, K], the teacher's log-probabilities at
      (z_s, s). Only positions still masked in z_s are read. They are floored
      at `log_prob_floor`, renormalised and put under stop_gradient.
    tokens: int[B, L], the cross-entropy targets at positions revealed in z_s.
      With the data trajectory these are the data tokens, which z_s carries.
    z_t: int[B, L], the student's input, with `mask_id` at masked positions.
    z_s: int[B, L], the teacher's input on the same trajectory, s < t.
    mask_id: the mask token id K.
    divergence: 'reverse_kl' (the MCD loss) or 'forward_kl' (an ablation).
    log_prob_floor: the floor on the teacher's log-probabilities.
    padding_mask: optional bool[B, L], True at real tokens. Padded positions
      contribute nothing.

  Returns:
    (loss, metrics). The loss is the sum of the per-position terms divided by
    the number of positions masked in z_t (at least 1). metrics contains 'ce_part'
    and 'kl_part', which add up to the loss, 'revealed_fraction' (the share of
    positions masked in z_t that are revealed in z_s) and 'num_masked'.
  """
  _check_divergence(divergence)

  # Which positions carry which loss term; each is bool[B, L].
  masked_t = z_t == mask_id
  if padding_mask is not None:
    masked_t = masked_t & padding_mask.astype(bool)
  revealed = masked_t & (z_s != mask_id)
  still_masked = masked_t & (z_s == mask_id)

  # Cross-entropy on positions revealed in z_s: the teacher's SUBS output there
  # is one-hot on the revealed token.
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  safe_tokens = jnp.where(revealed, tokens, 0)
  token_log_probs = jnp.take_along_axis(
      student_log_probs, safe_tokens[..., None], axis=-1)[..., 0]  # [B, L]
  cross_entropy = jnp.where(revealed, -token_log_probs, 0.0)

  # KL to the frozen teacher on positions still masked in z_s.
  teacher = floored_log_probs(teacher_log_probs.astype(jnp.float32), log_prob_floor)
  teacher = jax.lax.stop_gradient(teacher)
  kl = jnp.where(still_masked, distillation_kl(student_log_probs, teacher, divergence), 0.0)

  # Average over all positions masked in z_t.
  num_masked = jnp.sum(masked_t)
  denominator = jnp.maximum(num_masked, 1).astype(jnp.float32)
  ce_part = jnp.sum(cross_entropy) / denominator
  kl_part = jnp.sum(kl) / denominator
  loss = ce_part + kl_part
  metrics = {
      'loss': loss,
      'ce_part': ce_part,
      'kl_part': kl_part,
      'revealed_fraction': jnp.sum(revealed) / denominator,
      'num_masked': num_masked.astype(jnp.float32),
  }
  return loss, metrics


def teacher_reveal_step(teacher_log_probs, z_t, reveal, gumbel):
  """Reveals the positions in `reveal` deterministically from the teacher.

  A revealed position takes argmax_k(log x_φ(z_t)_k + G_k), with the Gumbel
  noise G fixed per position, so the same noise always gives the same tokens.
  teacher_log_probs, gumbel: float[B, L, K]; z_t: int[B, L]; reveal: bool[B, L].
  """
  tokens = jnp.argmax(teacher_log_probs + gumbel, axis=-1).astype(z_t.dtype)
  return jnp.where(reveal, tokens, z_t)


def mcd_step_loss(student_model: nn.Module, student_params: Any,
                  teacher_model: nn.Module, teacher_params: Any, tokens,
                  masking_times, t, delta, mask_id, *, trajectory_source='data',
                  gumbel=None, divergence='reverse_kl', log_prob_floor=-30.0,
                  padding_mask=None):
  """Builds the coupled pair (z_t, z_s = z_{t-Δ}), runs both models, returns mcd_loss.

  Args:
    student_model, teacher_model: Linen modules returning float[B, L, K] logits.
      Pass them as static arguments under jit.
    student_params: the parameters being trained.
    teacher_params: the frozen teacher's parameters. No gradient flows to them.
    tokens: int[B, L] data.
    masking_times: float[B, L], the per-position masking times τ.
    t: float[B], the student's times, in [Δ, 1].
    delta: the teacher's step size Δ (a scalar); s = max(t - Δ, 0).
    mask_id: the mask token id K.
    trajectory_source: 'data' takes z_s on the data trajectory: positions with
      s < τ <= t carry their data tokens. 'teacher' reveals those same
      positions with the teacher's deterministic step from z_t, which costs
      one more teacher call.
    gumbel: float[B, L, K] Gumbel noise, fixed per position; required for
      trajectory_source='teacher' and ignored otherwise.
    divergence, log_prob_floor, padding_mask: as in `mcd_loss`.

  Returns:
    (loss, metrics) from `mcd_loss`.
  """
  if trajectory_source not in TRAJECTORY_SOURCES:
    raise ValueError(f'Invalid trajectory_source {trajectory_source!r}. '
                     f'Choose one of {list(TRAJECTORY_SOURCES)}.')
  if trajectory_source == 'teacher' and gumbel is None:
    raise ValueError("trajectory_source='teacher' requires `gumbel`, float[B, L, K] Gumbel noise; it is missing.")

  # Coupled pair on one trajectory: positions with s < τ <= t are revealed in z_s.
  s = jnp.maximum(t - delta, 0.0)
  z_t, z_s = duality.coupled_pair(tokens, masking_times, t, s, mask_id)
  targets = tokens

  if trajectory_source == 'teacher':
    teacher_logits_t = _apply(teacher_model, teacher_params, z_t, t, padding_mask)
    teacher_log_probs_t = jax.nn.log_softmax(teacher_logits_t.astype(jnp.float32), axis=-1)
    reveal = (z_t == mask_id) & (z_s != mask_id)
    z_s = teacher_reveal_step(teacher_log_probs_t, z_t, reveal, gumbel)
    z_s = jax.lax.stop_gradient(z_s)
    targets = jnp.where(reveal, z_s, tokens)

  # Teacher at (z_s, s), frozen; student at (z_t, t).
  teacher_logits = _apply(teacher_model, teacher_params, z_s, s, padding_mask)
  teacher_log_probs = jax.lax.stop_gradient(
      jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1))
  student_logits = _apply(student_model, student_params, z_t, t, padding_mask)

  return mcd_loss(student_logits, teacher_log_probs, targets, z_t, z_s, mask_id,
                  divergence=divergence, log_prob_floor=log_prob_floor,
                  padding_mask=padding_mask)


def sample_distill_times(rng, batch_size: int, delta, antithetic: bool = True):
  """Samples the student's times t, uniform on [Δ, 1]; returns float32[batch_size].

  With `antithetic`, one uniform u_0 is shared and example i takes
  (u_0 + i / batch_size) mod 1, so the batch covers [Δ, 1] evenly and the loss
  has lower variance. `delta` may be a traced scalar.
  """
  if isinstance(delta, (int, float)) and not 0.0 <= delta <= 1.0:
    raise ValueError(f'delta must lie in [0, 1], got {delta}.')
  u = diffusion.sample_times(rng, batch_size, antithetic=antithetic)
  return delta + (1.0 - delta) * u
