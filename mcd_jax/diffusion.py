"""Masked diffusion: forward corruption, SUBS parameterization and the continuous-time ELBO.

Token ids 0 … K-1 are the vocabulary and K is the mask id. Time runs from t = 0
(clean) to t = 1 (fully masked), and a schedule gives the keep probability α_t
(see mcd_jax.schedules). The forward process masks each token independently:

  q(z_t | x) = Π_i [α_t · 1{z_t^i = x^i} + (1 - α_t) · 1{z_t^i = K}].

The denoiser x_θ(z_t, t) uses the SUBS parameterization: it puts no mass on the
mask token, and an unmasked position copies its token. The negative ELBO per
sequence is then

  E_t [ -α'_t / (1 - α_t) · Σ_{i: z_t^i = K} -log x_θ(z_t, t)_{x^i} ],

which the training loss divides by the number of real tokens.
"""

import functools
import math
from typing import Iterable

import jax
import jax.numpy as jnp

from mcd_jax import schedules as schedules_lib

# Log-probability given to the K - 1 tokens an unmasked position cannot take.
# It is finite so that exp() gives exactly 0 and 0 · log p stays 0, not NaN.
COPY_LOG_PROB_FLOOR = -1e9


def sample_times(rng, batch_size: int, antithetic: bool = True):
  """Draws diffusion times float32[batch_size] in [0, 1).

  Antithetic (stratified) draws are t_b = (u + b / B) mod 1 with one shared
  u ~ U(0, 1), so each interval [b / B, (b + 1) / B) contains exactly one time and
  the Monte Carlo variance of the ELBO over t drops.
  """
  if not antithetic:
    return jax.random.uniform(rng, (batch_size,), dtype=jnp.float32)
  offset = jax.random.uniform(rng, (), dtype=jnp.float32)
  strata = jnp.arange(batch_size, dtype=jnp.float32) / batch_size
  return jnp.mod(offset + strata, 1.0)


def corrupt(rng, tokens, t, schedule: schedules_lib.Schedule, mask_id: int):
  """Draws z_t ~ q(z_t | x): masks each token independently with probability 1 - α_t.

  tokens: int32[B, L], t: float32[B]. Returns int32[B, L].
  """
  alpha = schedule.alpha(t)[:, None]  # [B, 1]
  keep = jax.random.uniform(rng, tokens.shape) < alpha
  return jnp.where(keep, tokens, mask_id).astype(tokens.dtype)


def subs_log_probs(logits, z_t, mask_id: int):
  """Applies the SUBS parameterization to logits float32[B, L, K].

  At masked positions, returns the log-softmax over the K real tokens. The mask
  token gets no probability because the head has only K outputs. At unmasked
  positions it returns a copy of the input token: 0 for that token and
  COPY_LOG_PROB_FLOOR elsewhere. The copy does not depend on the logits, so
  gradients there are exactly 0.
  """
  vocab_size = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  # At masked positions one_hot(K, K) is all zeros, but the copy is unused there.
  copy = jnp.where(jax.nn.one_hot(z_t, vocab_size, dtype=bool), 0.0,
                   COPY_LOG_PROB_FLOOR)
  is_masked = (z_t == mask_id)[..., None]
  return jnp.where(is_masked, log_probs, copy)


def _apply_model(model, params, z_t, t, padding_mask, dropout_rng):
  """Runs the denoiser, with dropout exactly when dropout_rng is given."""
  if dropout_rng is None:
    return model.apply({'params': params}, z_t, t, padding_mask=padding_mask,
                       deterministic=True)
  return model.apply({'params': params}, z_t, t, padding_mask=padding_mask,
                     deterministic=False, rngs={'dropout': dropout_rng})


def elbo_terms(model, params, tokens, z_t, t, schedule, mask_id: int,
               padding_mask=None, dropout_rng=None):
  """Computes the negative-ELBO integrand at given times and corrupted inputs.

  Args:
    model: the denoiser, a Linen module returning float32[B, L, K] logits.
    params: its parameters.
    tokens: int32[B, L] clean data x.
    z_t: int32[B, L] corrupted data.
    t: float32[B] times in [0, 1], including exactly 0 and exactly 1.
    schedule: the masking schedule.
    mask_id: the mask token id K.
    padding_mask: bool[B, L], True at real tokens, or None when all are real.
    dropout_rng: a key to apply dropout, or None for a deterministic pass.

  Returns:
    (nats, num_tokens, num_masked): float32[B] weighted negative log-likelihood
    summed over the masked real positions of each sequence, float32[B] real
    tokens per sequence and float32[B] masked real tokens per sequence.
  """
  if padding_mask is None:
    padding_mask = jnp.ones(tokens.shape, dtype=bool)
  padding_mask = padding_mask.astype(bool)

  logits = _apply_model(model, params, z_t, t, padding_mask, dropout_rng)
  log_probs = subs_log_probs(logits, z_t, mask_id)  # [B, L, K]
  # Padded positions may contain ids outside [0, K). They are excluded below, so
  # clip only to keep the gather in range.
  targets = jnp.clip(tokens, 0, log_probs.shape[-1] - 1)
  target_log_probs = jnp.take_along_axis(
      log_probs, targets[..., None], axis=-1)[..., 0]  # [B, L]

  masked = (z_t == mask_id) & padding_mask
  masked_nll = jnp.where(masked, -target_log_probs, 0.0).sum(axis=-1)  # [B]
  # elbo_weight clips 1 - α_t below, so the weight is finite at t = 0, where
  # corrupt() masks nothing and the sum above is 0.
  nats = schedule.elbo_weight(t) * masked_nll

  num_tokens = padding_mask.sum(axis=-1).astype(jnp.float32)
  num_masked = masked.sum(axis=-1).astype(jnp.float32)
  return nats, num_tokens, num_masked


def elbo_loss(model, params, rng, tokens, schedule, mask_id: int,
              padding_mask=None, train=True, dropout_rng=None):
  """Computes the training loss: the negative ELBO in nats per real token.

  Draws one antithetic time per sequence and one corruption z_t.

  Args:
    model, params, tokens, schedule, mask_id, padding_mask: as in elbo_terms.
    rng: key for the times and the masks.
    train: applies dropout when True and the model has dropout_rate > 0.
    dropout_rng: key for dropout. If None and train is True, it is split from rng.

  Returns:
    (loss, metrics): a float32 scalar and a dict of float32 scalars ('loss',
    'bits_per_token', 'masked_fraction', 'num_tokens').
  """
  time_rng, mask_rng, split_dropout_rng = jax.random.split(rng, 3)
  if train and dropout_rng is None:
    dropout_rng = split_dropout_rng
  if not train or getattr(model, 'dropout_rate', 0.0) == 0.0:
    dropout_rng = None

  t = sample_times(time_rng, tokens.shape[0], antithetic=True)
  z_t = corrupt(mask_rng, tokens, t, schedule, mask_id)
  nats, num_tokens, num_masked = elbo_terms(
      model, params, tokens, z_t, t, schedule, mask_id, padding_mask,
      dropout_rng=dropout_rng)

  total_tokens = jnp.maximum(num_tokens.sum(), 1.0)
  loss = nats.sum() / total_tokens
  metrics = {
      'loss': loss,
      'bits_per_token': loss / math.log(2.0),
      'masked_fraction': num_masked.sum() / total_tokens,
      'num_tokens': num_tokens.sum(),
  }
  return loss, metrics


@functools.partial(
    jax.jit,
    static_argnames=('model', 'schedule', 'mask_id', 'num_time_samples'))
def elbo_nats(model, params, rng, tokens, schedule, mask_id: int,
              padding_mask=None, num_time_samples: int = 1):
  """Estimates the summed negative ELBO of one batch, for held-out evaluation.

  Averages num_time_samples independent antithetic draws of (t, z_t). Jitted
  with model, schedule, mask_id and num_time_samples static.

  Returns:
    (nats, num_tokens): float32 scalars, the negative ELBO summed over the
    batch and the number of real tokens. Sum both over batches and divide once
    to get nats per token.
  """

  def one_draw(draw_rng):
    time_rng, mask_rng = jax.random.split(draw_rng)
    t = sample_times(time_rng, tokens.shape[0], antithetic=True)
    z_t = corrupt(mask_rng, tokens, t, schedule, mask_id)
    nats, num_tokens, _ = elbo_terms(
        model, params, tokens, z_t, t, schedule, mask_id, padding_mask)
    return nats.sum(), num_tokens.sum()

  nats, num_tokens = jax.lax.map(
      one_draw, jax.random.split(rng, num_time_samples))
  return nats.mean(), num_tokens[0]


def summarize_nats(nats, num_tokens):
  """Converts summed nats and a token count to ELBO metrics (Python floats).

  Returns a dict with 'nats_per_token', 'bits_per_token' (nats / ln 2),
  'perplexity_bound' (exp of nats per token, an upper bound on perplexity)
  and 'num_tokens'.
  """
  nats_per_token = float(nats) / max(float(num_tokens), 1.0)
  return {
      'nats_per_token': nats_per_token,
      'bits_per_token': nats_per_token / math.log(2.0),
      'perplexity_bound': math.exp(nats_per_token),
      'num_tokens': float(num_tokens),
  }


def validation_elbo(model, params, rng, batches: Iterable, schedule, mask_id: int,
                    num_time_samples: int = 1):
  """Evaluates the held-out ELBO over batches, aggregated over tokens.

  Args:
    batches: an iterable of int32[B, L] token arrays or of dicts with 'tokens'
      and, optionally, 'padding_mask'.
    num_time_samples: antithetic (t, z_t) draws per batch.

  Returns:
    The dict of summarize_nats. Batch number i (from 0) uses the key
    jax.random.fold_in(rng, i).
  """
  total_nats = 0.0
  total_tokens = 0.0

  for index, batch in enumerate(batches):
    if isinstance(batch, dict):
      tokens, padding_mask = batch['tokens'], batch.get('padding_mask')
    else:
      tokens, padding_mask = batch, None
    nats, num_tokens = elbo_nats(
        model, params, jax.random.fold_in(rng, index), tokens,
        schedule=schedule, mask_id=mask_id, padding_mask=padding_mask,
        num_time_samples=num_time_samples)
    total_nats += float(nats)
    total_tokens += float(num_tokens)

  return summarize_nats(total_nats, total_tokens)
