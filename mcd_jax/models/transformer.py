"""The denoiser and the autoregressive evaluator: one DiT-style Flax Linen transformer.

Pre-LayerNorm blocks with rotary position embeddings, a GELU MLP and an untied
output head. Two switches select the role:

- `time_conditioning=True` adds adaLN-zero modulation from a sinusoidal
  embedding of t, as in DiT. Every block starts as the identity map. With
  `time_conditioning=False` (the MDLM default for masked diffusion, which needs
  no time input because the number of masks reveals t) the argument t is ignored.
- `causal=True` gives causal attention, for the autoregressive evaluator and
  baseline. A causal model cloned with `decode=True` runs incremental decoding
  with a key/value cache in the 'cache' collection (see mcd_jax/decoding.py).

Every parameter is boxed with logical axis names ('vocab', 'embed', 'mlp',
'heads', 'kv', 'time', and 'layers' when scanned), and activations carry
logical constraints ('batch', 'length', ...), so the sharding code maps both to
a device mesh with a rules table. Parameters are float32. The `dtype` field sets
the compute dtype, and logits are always returned as float32.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Width of the sinusoidal time features fed to the time MLP.
TIME_EMBEDDING_DIM = 256
# t in [0, 1] is multiplied by this before the sinusoidal embedding, so that the
# frequencies span the range DiT uses for integer diffusion steps 0 … 1000.
TIME_SCALE = 1000.0
ROPE_BASE = 10_000.0


def _compute_dtype(dtype) -> jnp.dtype:
  """Converts 'float32', 'bfloat16' or a jnp dtype to a jnp dtype."""
  return jnp.dtype(dtype)


def _dense(features, names, dtype, kernel_init=None, name=None):
  """nn.Dense with float32 parameters boxed with logical axis names (in, out)."""
  if kernel_init is None:
    kernel_init = nn.initializers.lecun_normal()
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (names[-1],)),
      name=name)


def _layer_norm(affine, dtype, name):
  """LayerNorm over 'embed'. adaLN blocks drop the affine part (affine=False)."""
  return nn.LayerNorm(
      use_bias=affine,
      use_scale=affine,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(
          nn.initializers.ones_init(), ('embed',)),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ('embed',)),
      name=name)


def _round_up(size, multiple):
  return -(-size // multiple) * multiple


def sinusoidal_time_features(t, dim=TIME_EMBEDDING_DIM):
  """Sinusoidal features of TIME_SCALE · t: float32[B] -> float32[B, dim]."""
  half = dim // 2
  frequencies = np.exp(-math.log(10_000.0) * np.arange(half) / half)
  angles = (TIME_SCALE * t.astype(jnp.float32))[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def apply_rotary(x, positions):
  """Rotates pairs (x[..., i], x[..., i + D/2]) by angle position · ROPE_BASE^(-2i/D).

  x: [B, L, H, D] with D even, positions: int32[L]. Computed in float32 and
  cast back to x.dtype.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inverse_frequencies = ROPE_BASE ** (-np.arange(half) * 2.0 / head_dim)
  angles = positions.astype(jnp.float32)[:, None] * inverse_frequencies  # [L, D/2]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]

  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class TimeEmbedding(nn.Module):
  """MLP on sinusoidal features of t: float32[B] -> [B, d_model]."""

  d_model: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    features = sinusoidal_time_features(t)
    hidden = _dense(self.d_model, ('time', 'mlp'), self.dtype, name='hidden')(
        features)
    hidden = nn.silu(hidden)
    return _dense(self.d_model, ('mlp', 'embed'), self.dtype, name='output')(
        hidden)


class Attention(nn.Module):
  """Multi-head self-attention with rotary positions.

  With `decode=True` the module keeps the rotated keys and the values of every
  position seen so far in the 'cache' collection. The first call (`init`)
  allocates the cache with the input's length as its capacity. Each later call
  takes the next S positions, writes their keys and values at the cache index
  and attends to all cached positions up to its own.
  """

  num_heads: int
  head_dim: int
  causal: bool
  dtype: Any = jnp.float32
  attention_implementation: str | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, x, attention_mask):
    """x: [B, L, d_model]; attention_mask: bool[B, 1, 1, L] (True = key kept) or None."""
    d_model = x.shape[-1]
    # DenseGeneral calls the initializer on the kernel flattened to 2-D.
    kernel_init = nn.initializers.lecun_normal()

    def projection(name):
      return nn.DenseGeneral(
          (self.num_heads, self.head_dim),
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              kernel_init, ('embed', 'heads', 'kv')),
          name=name)

    query = projection('query')(x)  # [B, L, H, D]
    key = projection('key')(x)
    value = projection('value')(x)
    positions = jnp.arange(x.shape[1])

    if self.decode:
      # The cache is allocated by `init` and only read and written by later calls.
      is_initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape,
                                   value.dtype)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.zeros((), jnp.int32))
      if is_initialized:
        index = cache_index.value
        positions = index + positions  # [S], the absolute positions of the inputs
        query = apply_rotary(query, positions)
        key = apply_rotary(key, positions)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key, (0, index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value, (0, index, 0, 0))
        cache_index.value = index + x.shape[1]

        # The query at position p attends to cached keys 0 … p. Later slots are unwritten.
        capacity = cached_key.value.shape[1]
        visible = jnp.arange(capacity)[None, :] <= positions[:, None]  # [S, capacity]
        attended = jax.nn.dot_product_attention(
            query, cached_key.value, cached_value.value,
            mask=visible[None, None],
            implementation=self.attention_implementation)
        return self._project_output(attended, d_model)

    query = apply_rotary(query, positions)
    key = apply_rotary(key, positions)
    activation_names = ('batch', 'length', 'heads', 'kv')
    query = nn.with_logical_constraint(query, activation_names)
    key = nn.with_logical_constraint(key, activation_names)
    value = nn.with_logical_constraint(value, activation_names)

    # Logits and softmax are computed in float32 by jax.nn.dot_product_attention.
    # Masked keys get a large negative logit, so their softmax weight is exactly 0.
    # NOTE: only the default XLA implementation (None) is exercised by the tests.
    attended = jax.nn.dot_product_attention(
        query, key, value,
        mask=attention_mask,
        is_causal=self.causal,
        implementation=self.attention_implementation)
    attended = nn.with_logical_constraint(attended, activation_names)
    return self._project_output(attended, d_model)

  @nn.nowrap
  def _project_output(self, attended, d_model):
    """Projects [B, L, H, D] back to [B, L, d_model] with the 'output' kernel."""
    return nn.DenseGeneral(
        d_model,
        axis=(-2, -1),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(),
            ('heads', 'kv', 'embed')),
        name='output')(attended)


class Block(nn.Module):
  """Pre-norm transformer block, with adaLN-zero modulation when time-conditioned.

  With `scanned=True` the block returns (x, None), the carry form nn.scan expects.
  """

  num_heads: int
  mlp_dim: int
  causal: bool
  time_conditioning: bool
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_implementation: str | None = None
  scanned: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, condition, attention_mask, deterministic):
    d_model = x.shape[-1]
    head_dim = d_model // self.num_heads
    affine_norm = not self.time_conditioning

    # adaLN-zero: shift, scale and gate for both branches, all zero at init,
    # so the block starts as the identity map.
    if self.time_conditioning:
      modulation = _dense(
          6 * d_model, ('embed', 'mlp'), self.dtype,
          kernel_init=nn.initializers.zeros_init(), name='modulation')(
              nn.silu(condition))
      (shift_attention, scale_attention, gate_attention,
       shift_mlp, scale_mlp, gate_mlp) = jnp.split(
           modulation[:, None, :], 6, axis=-1)  # each [B, 1, d_model]

    # Attention branch.
    h = _layer_norm(affine_norm, self.dtype, 'attention_norm')(x)
    if self.time_conditioning:
      h = h * (1 + scale_attention) + shift_attention
    h = Attention(
        self.num_heads, head_dim, self.causal, self.dtype,
        self.attention_implementation, self.decode, name='attention')(
            h, attention_mask)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    if self.time_conditioning:
      h = gate_attention * h
    x = nn.with_logical_constraint(x + h, ('batch', 'length', 'embed'))

    # MLP branch.
    h = _layer_norm(affine_norm, self.dtype, 'mlp_norm')(x)
    if self.time_conditioning:
      h = h * (1 + scale_mlp) + shift_mlp
    h = _dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, name='mlp_in')(h)
    h = nn.with_logical_constraint(nn.gelu(h), ('batch', 'length', 'mlp'))
    h = _dense(d_model, ('mlp', 'embed'), self.dtype, name='mlp_out')(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    if self.time_conditioning:
      h = gate_mlp * h
    x = nn.with_logical_constraint(x + h, ('batch', 'length', 'embed'))

    if self.scanned:
      return x, None
    return x


class Transformer(nn.Module):
  """DiT-style transformer over token ids: int32[B, L] -> float32[B, L, output_size].

  Attributes:
    vocab_size: number of input ids (K + 1 for diffusion, which embeds the mask).
    output_size: number of output logits (K, the real tokens).
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: attention heads. d_model / num_heads must be an even integer.
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout after the attention and MLP branches.
    time_conditioning: adaLN-zero modulation from t. When False, t is ignored.
    causal: causal attention (autoregressive model).
    dtype: compute dtype, a jnp dtype or its name ('float32', 'bfloat16').
    remat: recompute each block's activations in the backward pass.
    scan_layers: run the blocks with nn.scan. Parameters then get a leading
      'layers' axis.
    attention_implementation: passed to jax.nn.dot_product_attention (None
      selects XLA, 'cudnn' needs a GPU and a 16-bit dtype).
    pad_vocab_multiple: the embedding rows and the head outputs are padded up
      to a multiple of this, so that the 'vocab' axis divides evenly over a
      tensor-parallel mesh axis. The padded logits are dropped before returning.
    absolute_positions: when > 0, a learned absolute position embedding for
      up to this many positions is added to the token embedding, beside the
      rotary embedding. Off (0) by default: text is close to translation
      invariant, but a source whose marginals depend on the absolute position
      cannot be fitted by relative positions alone.
    decode: incremental decoding with a key/value cache, for causal models
      only. `init` with int32[B, max_len] tokens allocates the 'cache'
      collection. Each `apply(..., mutable=['cache'])` then takes the next
      int32[B, S] tokens and returns their logits and the updated cache.
  """

  vocab_size: int
  output_size: int
  d_model: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  time_conditioning: bool = False
  causal: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  attention_implementation: str | None = None
  pad_vocab_multiple: int = 128
  absolute_positions: int = 0
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, t=None, padding_mask=None, deterministic=True):
    """Returns float32[B, L, output_size] logits.

    Args:
      tokens: int32[B, L] ids in [0, vocab_size).
      t: float32[B] diffusion times, required when time_conditioning is True.
      padding_mask: bool[B, L], True at real tokens. Padded keys are excluded
        from attention, so outputs at real positions do not depend on tokens at
        padded positions. Outputs at padded positions are meaningless.
      deterministic: disables dropout. When False, pass a 'dropout' rng to apply.
    """
    self._check_shapes()
    dtype = _compute_dtype(self.dtype)
    if self.time_conditioning and t is None:
      raise ValueError('This Transformer has time_conditioning=True, so t '
                       '(float32[batch]) is required, but t is None.')

    x = nn.Embed(
        _round_up(self.vocab_size, self.pad_vocab_multiple),
        self.d_model,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'normal',
                                             out_axis=0),
            ('vocab', 'embed')),
        name='embedding')(tokens)  # [B, L, d_model]
    if self.absolute_positions:
      if self.decode:
        raise ValueError('absolute_positions is not supported with decode=True.')
      if tokens.shape[1] > self.absolute_positions:
        raise ValueError(f'The sequence has {tokens.shape[1]} positions but the model '
                         f'embeds at most absolute_positions={self.absolute_positions}.')
      positions = self.param(
          'position_embedding',
          nn.with_logical_partitioning(nn.initializers.normal(0.02), ('length', 'embed')),
          (self.absolute_positions, self.d_model), jnp.float32)
      x = x + positions[:tokens.shape[1]].astype(dtype)[None]
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    condition = None
    if self.time_conditioning:
      condition = TimeEmbedding(self.d_model, dtype, name='time_embedding')(t)

    attention_mask = None
    if padding_mask is not None:
      attention_mask = padding_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]

    x = self._blocks(x, condition, attention_mask, deterministic, dtype)

    # Final norm, with adaLN-zero shift and scale when time-conditioned.
    x = _layer_norm(not self.time_conditioning, dtype, 'final_norm')(x)
    if self.time_conditioning:
      modulation = _dense(
          2 * self.d_model, ('embed', 'mlp'), dtype,
          kernel_init=nn.initializers.zeros_init(), name='final_modulation')(
              nn.silu(condition))
      shift, scale = jnp.split(modulation[:, None, :], 2, axis=-1)
      x = x * (1 + scale) + shift

    padded_output_size = _round_up(self.output_size, self.pad_vocab_multiple)
    logits = _dense(padded_output_size, ('embed', 'vocab'), dtype,
                    name='head')(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    return logits[..., :self.output_size].astype(jnp.float32)

  def _check_shapes(self):
    if self.decode and not self.causal:
      raise ValueError('decode=True needs a causal model (causal=True): a key/value '
                       'cache is only valid when no position attends to later ones.')
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise ValueError(
          f'd_model / num_heads must be an even integer for rotary embeddings, '
          f'got d_model={self.d_model}, num_heads={self.num_heads}.')

  def _blocks(self, x, condition, attention_mask, deterministic, dtype):
    """Applies num_layers blocks, looped or scanned, rematerialised if asked."""
    block_class = Block
    if self.remat:
      # Argument 4 (counting self as 0) is `deterministic`, a Python bool.
      block_class = nn.remat(Block, static_argnums=(4,))
    block_fields = dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        causal=self.causal,
        time_conditioning=self.time_conditioning,
        dropout_rate=self.dropout_rate,
        dtype=dtype,
        attention_implementation=self.attention_implementation,
        decode=self.decode)

    if self.scan_layers:
      scanned_blocks = nn.scan(
          block_class,
          variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned_blocks(**block_fields, scanned=True, name='layers')(
          x, condition, attention_mask, deterministic)
      return x

    for layer in range(self.num_layers):
      x = block_class(**block_fields, name=f'block_{layer}')(
          x, condition, attention_mask, deterministic)
    return x


def from_config(model_config, vocab_size: int, output_size: int,
                causal: bool) -> Transformer:
  """Builds a Transformer from a ConfigDict with the model fields.

  Reads d_model, num_layers, num_heads, mlp_dim, dropout_rate,
  time_conditioning, dtype and remat, and optionally scan_layers,
  attention_implementation and pad_vocab_multiple.
  """
  return Transformer(
      vocab_size=vocab_size,
      output_size=output_size,
      d_model=model_config.d_model,
      num_layers=model_config.num_layers,
      num_heads=model_config.num_heads,
      mlp_dim=model_config.mlp_dim,
      dropout_rate=model_config.dropout_rate,
      time_conditioning=model_config.time_conditioning,
      causal=causal,
      dtype=model_config.dtype,
      remat=model_config.remat,
      scan_layers=model_config.get('scan_layers', False),
      attention_implementation=model_config.get('attention_implementation') or None,
      pad_vocab_multiple=model_config.get('pad_vocab_multiple', 128),
      absolute_positions=model_config.get('absolute_positions', 0))


def count_params(params) -> int:
  """Counts the scalars in a (possibly boxed or abstract) parameter tree.

  The count includes the padded embedding rows and head outputs.
  """
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))


def matmul_params_per_token(module: Transformer) -> int:
  """Counts the weights that multiply each token's activations.

  These are the attention projections, the MLP and the output head without
  its padding (pad_vocab_multiple). The input embedding is a lookup, and the time MLP and adaLN modulation run once per
  sequence, so none of them is counted.
  """
  d = module.d_model
  per_layer = 4 * d * d + 2 * d * module.mlp_dim
  return module.num_layers * per_layer + d * module.output_size


def forward_flops_per_token(module: Transformer, seq_len: int) -> int:
  """Estimates the FLOPs of one forward pass per token: 2N + 4 · layers · L · d.

  N is matmul_params_per_token (one multiply-add, 2 FLOPs, per weight). The
  attention term counts Q·Kᵀ and the weighted sum of V, each L · d_model
  multiply-adds per token and layer. This is the estimate of the PaLM paper
  (Chowdhery et al., 2022, appendix B). It counts all L keys even for causal
  attention and ignores norms, softmax and elementwise work.
  """
  attention = 4 * module.num_layers * seq_len * module.d_model
  return 2 * matmul_params_per_token(module) + attention


def train_flops_per_token(module: Transformer, seq_len: int) -> int:
  """Estimates the FLOPs of a training step per token: 3 × forward (6N + attention).

  The backward pass costs about twice the forward pass. Rematerialisation
  (remat=True) adds one more forward pass that this estimate does not count.
  """
  return 3 * forward_flops_per_token(module, seq_len)
