"""Autoregressive sampling from the causal transformer, with or without a KV cache.

The causal model has no BOS token, so it never predicts the first token of a
sequence (see mcd_jax/autoregressive.py). Sampling therefore starts from a
prompt of at least one token and draws positions P … L-1 one at a time.

  * `sample(..., use_cache=True)` runs the model cloned with `decode=True`: each
    step feeds one token, appends its rotated key and its value to the cache
    and attends to the cached positions, so a step costs O(L) attention work
    and the per-token matmuls.
  * `sample(..., use_cache=False)` reruns the full causal forward pass on the
    whole [B, L] buffer at every step and reads the logits at the current
    position. It is the reference the cached path is tested against.

Both paths are one jitted `lax.scan` over positions. Step i draws token i + 1
with the Gumbel noise of `fold_in(rng, i)`, so for a fixed key the two paths
return the same tokens up to floating-point differences between their logits.
The prompt length is traced, so prompts of different lengths but the same
padded shape reuse one compiled program.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcd_jax import categorical


def init_cache(model, batch_size: int, max_len: int):
  """Returns a zero key/value cache for `max_len` positions of `batch_size` rows.

  `model` is the causal Transformer (with decode False or True). Only shapes are
  traced, so no parameters are initialised.
  """
  decoder = model.clone(decode=True)
  tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(
      lambda tokens: decoder.init(jax.random.key(0), tokens, None), tokens)['cache']
  return jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)


def decode_step(model, params, cache, tokens):
  """Feeds the next S tokens int32[B, S]; returns (float32[B, S, K] logits, new cache)."""
  decoder = model.clone(decode=True)
  logits, variables = decoder.apply({'params': params, 'cache': cache}, tokens, None,
                                    deterministic=True, mutable=['cache'])
  return logits, variables['cache']


@functools.partial(jax.jit, static_argnames=('model',))
def cached_logits(model, params, tokens):
  """Teacher-forces `tokens` int32[B, L] through the cache, one position per step.

  Returns float32[B, L, K], the logits at every position. They equal the full
  causal forward pass `model.apply({'params': params}, tokens)` up to float
  rounding; the tests check this.
  """
  batch_size, seq_len = tokens.shape
  cache = init_cache(model, batch_size, seq_len)

  def body(cache, position):
    current = jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1)  # [B, 1]
    logits, cache = decode_step(model, params, cache, current)
    return cache, logits[:, 0]

  _, logits = jax.lax.scan(body, cache, jnp.arange(seq_len))  # [L, B, K]
  return jnp.moveaxis(logits, 0, 1)


def _next_tokens(rng, position, logits, tokens, prompt_length, temperature, forbidden):
  """Token i + 1 for i = `position`: the prompt's where it has one, else a draw."""
  gumbel = categorical.gumbel_noise(jax.random.fold_in(rng, position), logits.shape)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  sampled = categorical.gumbel_argmax(log_probs, gumbel, temperature=temperature,
                                      forbidden=forbidden)  # [B]
  prompted = jax.lax.dynamic_index_in_dim(tokens, position + 1, axis=1, keepdims=False)
  return jnp.where(position + 1 < prompt_length, prompted, sampled).astype(jnp.int32)


_STATIC = ('model', 'forbidden')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _cached_core(model, params, rng, tokens, prompt_length, temperature, *, forbidden):
  batch_size, seq_len = tokens.shape
  cache = init_cache(model, batch_size, seq_len)

  def body(carry, position):
    tokens, cache = carry
    current = jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1)  # [B, 1]
    logits, cache = decode_step(model, params, cache, current)
    chosen = _next_tokens(rng, position, logits[:, 0], tokens, prompt_length,
                          temperature, forbidden)
    tokens = jax.lax.dynamic_update_slice(tokens, chosen[:, None], (0, position + 1))
    return (tokens, cache), None

  (tokens, _), _ = jax.lax.scan(body, (tokens, cache), jnp.arange(seq_len - 1))
  return tokens


@functools.partial(jax.jit, static_argnames=_STATIC)
def _uncached_core(model, params, rng, tokens, prompt_length, temperature, *, forbidden):
  _, seq_len = tokens.shape

  def body(tokens, position):
    # Causal attention: the logits at `position` ignore the unfilled slots after it.
    all_logits = model.apply({'params': params}, tokens, None, deterministic=True)
    logits = jax.lax.dynamic_index_in_dim(all_logits, position, axis=1, keepdims=False)
    chosen = _next_tokens(rng, position, logits, tokens, prompt_length, temperature,
                          forbidden)
    return jax.lax.dynamic_update_slice(tokens, chosen[:, None], (0, position + 1)), None

  tokens, _ = jax.lax.scan(body, tokens, jnp.arange(seq_len - 1))
  return tokens


def _prompt_batch(prompt, batch_size, seq_len, vocab_size) -> np.ndarray:
  """Validates the prompt and returns it as host int32[B, P]."""
  prompt = np.asarray(prompt)
  if prompt.ndim == 1:
    if batch_size is None:
      raise ValueError('A prompt of shape [P] needs batch_size.')
    prompt = np.broadcast_to(prompt, (batch_size, prompt.shape[0]))
  if prompt.ndim != 2 or (batch_size is not None and prompt.shape[0] != batch_size):
    raise ValueError(f'prompt must have shape [P] or [batch_size, P], got {prompt.shape} '
                     f'with batch_size={batch_size}.')
  if not 1 <= prompt.shape[1] <= seq_len:
    raise ValueError(
        f'The prompt has {prompt.shape[1]} tokens; it needs between 1 and seq_len='
        f'{seq_len}, because the model has no BOS token and cannot draw the first one.')
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f'prompt must contain integer token ids, got dtype {prompt.dtype}.')
  if prompt.min() < 0 or prompt.max() >= vocab_size:
    raise ValueError(f'prompt contains ids outside [0, {vocab_size}).')
  return prompt.astype(np.int32)


def sample(model, params, rng, prompt, *, seq_len: int, batch_size: int | None = None,
           temperature: float = 1.0, forbidden: Sequence[int] | None = None,
           use_cache: bool = True) -> jax.Array:
  """Samples B sequences of `seq_len` tokens that start with `prompt`.

  Args:
    model: a causal `Transformer` (causal=True, no time conditioning) with
      K = model.output_size real tokens.
    params: its parameters.
    rng: PRNG key. Step i uses fold_in(rng, i), whatever the batch size.
    prompt: int[P] or int[B, P] ids in [0, K), with 1 <= P <= seq_len.
    seq_len: L, the length of the returned sequences.
    batch_size: B; required for a prompt of shape [P].
    temperature: positive; divides the log-probabilities before each draw.
    forbidden: token ids never drawn.
    use_cache: decode with the key/value cache (True) or rerun the full causal
      pass at every step (False).

  Returns:
    int32[B, L]; positions 0 … P-1 hold the prompt.
  """
  if not getattr(model, 'causal', False):
    raise ValueError('Autoregressive sampling needs a causal model (causal=True).')
  if int(seq_len) != seq_len or seq_len < 1:
    raise ValueError(f'seq_len must be a positive integer, got {seq_len!r}.')
  if not temperature > 0:
    raise ValueError(f'temperature must be positive, got {temperature!r}.')
  vocab_size = model.output_size
  prompt = _prompt_batch(prompt, batch_size, seq_len, vocab_size)

  tokens = np.zeros((prompt.shape[0], seq_len), np.int32)
  tokens[:, :prompt.shape[1]] = prompt
  mask = categorical.forbidden_mask(forbidden, vocab_size)
  forbidden_ids = None if mask is None else tuple(int(i) for i in np.flatnonzero(mask))
  core = _cached_core if use_cache else _uncached_core
  return core(model, params, rng, jnp.asarray(tokens), jnp.int32(prompt.shape[1]),
              jnp.float32(temperature), forbidden=forbidden_ids)
