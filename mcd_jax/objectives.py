"""The training objective of each task, behind one signature for the trainer.

Every loss has the signature

  loss_fn(params, tokens, rng, teacher_params, delta) -> (loss, metrics)

with `tokens: int32[B, L]`. `teacher_params` and `delta` (the round's teacher
step size Δ) are used by distillation only; the other tasks ignore them. The
teacher is an explicit argument so it is sharded, frozen and never captured.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcd_jax import autoregressive
from mcd_jax import categorical
from mcd_jax import diffusion
from mcd_jax import duality
from mcd_jax import schedules
from mcd_jax.distill import mcd
from mcd_jax.distill import sdtt

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A task's training loss and its per-batch validation statistics."""

  loss_fn: LossFn
  # eval_fn(params, tokens, rng) -> (summed nats, token count) on one batch.
  eval_fn: Callable[..., tuple[jax.Array, jax.Array]]
  # The unit of the validation metric: ELBO bits per token, or AR bits per token.
  eval_name: str


def diffusion_objective(model: nn.Module, schedule: schedules.Schedule,
                        mask_id: int) -> Objective:

  def loss_fn(params, tokens, rng, teacher_params=None, delta=None):
    del teacher_params, delta
    return diffusion.elbo_loss(model, params, rng, tokens, schedule, mask_id)

  def eval_fn(params, tokens, rng):
    return diffusion.elbo_nats(model, params, rng, tokens, schedule, mask_id)

  return Objective(loss_fn, eval_fn, 'elbo_bits_per_token')


def autoregressive_objective(model: nn.Module) -> Objective:

  def loss_fn(params, tokens, rng, teacher_params=None, delta=None):
    del teacher_params, delta
    return autoregressive.next_token_loss(model, params, tokens, train=True,
                                          dropout_rng=rng)

  def eval_fn(params, tokens, rng):
    del rng
    log_likelihood, count = autoregressive.sequence_log_likelihood(model, params, tokens)
    return -jnp.sum(log_likelihood), jnp.sum(count)

  return Objective(loss_fn, eval_fn, 'ar_bits_per_token')


def distill_objective(model: nn.Module, schedule: schedules.Schedule, mask_id: int,
                      vocab_size: int, distill_config) -> Objective:
  """MCD (or the SDTT baseline) with student and teacher of the same architecture."""

  def loss_fn(params, tokens, rng, teacher_params, delta):
    time_rng, noise_rng, gumbel_rng, target_rng = jax.random.split(rng, 4)
    batch_size = tokens.shape[0]
    t = mcd.sample_distill_times(time_rng, batch_size, delta)

    if distill_config.method == 'sdtt':
      z_t = diffusion.corrupt(noise_rng, tokens, t, schedule, mask_id)
      target = sdtt.sdtt_target(model, teacher_params, target_rng, z_t, t, delta,
                                mask_id, schedule)
      student_logits = model.apply({'params': params}, z_t, t)
      return sdtt.sdtt_loss(student_logits, target, z_t, mask_id,
                            divergence=distill_config.divergence)

    masking_times = duality.masking_times(noise_rng, tokens.shape, schedule, vocab_size)
    gumbel = None
    if distill_config.trajectory_source == 'teacher':
      # float32[B, L, K], the size of the logits; only the teacher source uses it.
      gumbel = categorical.gumbel_noise(gumbel_rng, tokens.shape + (vocab_size,))
    return mcd.mcd_step_loss(
        model, params, model, teacher_params, tokens, masking_times, t, delta, mask_id,
        trajectory_source=distill_config.trajectory_source,
        divergence=distill_config.divergence,
        log_prob_floor=distill_config.log_prob_floor,
        gumbel=gumbel)

  def eval_fn(params, tokens, rng):
    return diffusion.elbo_nats(model, params, rng, tokens, schedule, mask_id)

  return Objective(loss_fn, eval_fn, 'elbo_bits_per_token')


def make_objective(config, model: nn.Module, schedule: schedules.Schedule,
                   vocab_size: int) -> Objective:
  mask_id = vocab_size
  if config.task == 'diffusion':
    return diffusion_objective(model, schedule, mask_id)
  if config.task == 'autoregressive':
    return autoregressive_objective(model)
  return distill_objective(model, schedule, mask_id, vocab_size, config.distill)
