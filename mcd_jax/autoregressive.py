"""Next-token loss and sequence likelihood for the causal transformer.

The causal model embeds the K real ids (no mask token) and predicts K logits.
The output at position i is the distribution of token i + 1. There is no BOS
token, so the first token of each sequence is never predicted: a sequence of L
real tokens contributes L - 1 predicted tokens to every loss and likelihood
here. The same model is the autoregressive baseline and the Gen PPL evaluator.
"""

import math

import jax
import jax.numpy as jnp


def _next_token_log_probs(model, params, tokens, padding_mask, dropout_rng):
  """Returns (log p(token i+1 | tokens ≤ i) float32[B, L-1], bool[B, L-1] validity)."""
  if padding_mask is None:
    padding_mask = jnp.ones(tokens.shape, dtype=bool)
  padding_mask = padding_mask.astype(bool)

  if dropout_rng is None:
    logits = model.apply({'params': params}, tokens, None,
                         padding_mask=padding_mask, deterministic=True)
  else:
    logits = model.apply({'params': params}, tokens, None,
                         padding_mask=padding_mask, deterministic=False,
                         rngs={'dropout': dropout_rng})

  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, L-1, K]
  # Padded positions may contain ids outside [0, K). They are excluded by `valid`,
  # so clip only to keep the gather in range.
  targets = jnp.clip(tokens[:, 1:], 0, log_probs.shape[-1] - 1)
  target_log_probs = jnp.take_along_axis(
      log_probs, targets[..., None], axis=-1)[..., 0]

  # A prediction counts when both its input position and its target are real.
  valid = padding_mask[:, :-1] & padding_mask[:, 1:]
  return target_log_probs, valid


def next_token_loss(model, params, tokens, padding_mask=None, train=False,
                    dropout_rng=None):
  """Computes the mean negative log-likelihood per predicted token, in nats.

  Args:
    model: a causal Transformer returning float32[B, L, K] logits.
    params: its parameters.
    tokens: int32[B, L] ids in [0, K).
    padding_mask: bool[B, L], True at real tokens, or None when all are real.
    train: applies dropout when True, a dropout_rng is given and the model has
      dropout_rate > 0.
    dropout_rng: key for dropout.

  Returns:
    (loss, metrics): a float32 scalar and a dict of float32 scalars ('loss',
    'bits_per_token', 'perplexity', 'num_tokens'), where 'num_tokens' counts
    predicted tokens.
  """
  if not train or getattr(model, 'dropout_rate', 0.0) == 0.0:
    dropout_rng = None
  target_log_probs, valid = _next_token_log_probs(
      model, params, tokens, padding_mask, dropout_rng)

  num_tokens = valid.sum().astype(jnp.float32)
  nats = jnp.where(valid, -target_log_probs, 0.0).sum()
  loss = nats / jnp.maximum(num_tokens, 1.0)
  metrics = {
      'loss': loss,
      'bits_per_token': loss / math.log(2.0),
      'perplexity': jnp.exp(loss),
      'num_tokens': num_tokens,
  }
  return loss, metrics


def sequence_log_likelihood(model, params, tokens, padding_mask=None):
  """Computes each sequence's log-likelihood under the causal model, for Gen PPL.

  Returns:
    (log_prob, num_tokens): float32[B] log p summed over the predicted tokens of
    each sequence (all real tokens but the first), and float32[B] their count.
    Gen PPL is exp(-Σ log_prob / Σ num_tokens) with both sums over every
    sample; never average per-batch perplexities.
  """
  target_log_probs, valid = _next_token_log_probs(
      model, params, tokens, padding_mask, dropout_rng=None)
  log_prob = jnp.where(valid, target_log_probs, 0.0).sum(axis=-1)
  num_tokens = valid.sum(axis=-1).astype(jnp.float32)
  return log_prob, num_tokens
