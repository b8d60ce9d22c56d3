"""Train state, optimizer, and state creation already sharded on the mesh."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mcd_jax import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a training step updates; the teacher is never part of it."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int
                  ) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to 10%, after global-norm clipping."""
  warmup = min(optim.warmup_steps, max(num_steps - 1, 0))
  learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=0.1 * optim.learning_rate,
  )

  # Weight decay applies to matrices only, not to biases and norm scales.
  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)

  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2,
                  weight_decay=optim.weight_decay, mask=decay_mask),
  )


def update_ema(ema_params, params, rate: float):
  return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def _init_boxed_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                      batch_size: int, seq_len: int) -> TrainState:
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  times = jnp.zeros((batch_size,), jnp.float32)
  params = model.init({'params': rng, 'dropout': rng}, tokens, times)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), ema_params=params)


def abstract_state_and_shardings(model, tx, mesh, rules, seq_len: int):
  """Returns the abstract (shape-only) unboxed state and its NamedShardings."""
  init = lambda rng: _init_boxed_state(model, tx, rng, 1, seq_len)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_state(model, tx, rng, mesh, rules, seq_len: int, shardings=None):
  """Initialises the state directly with its shardings: no host copy of the whole model.

  Pass `shardings` from `abstract_state_and_shardings` when the caller has them
  already; otherwise they are derived here.
  """
  if shardings is None:
    _, shardings = abstract_state_and_shardings(model, tx, mesh, rules, seq_len)
  init = lambda key: nn.meta.unbox(_init_boxed_state(model, tx, key, 1, seq_len))
  return jax.jit(init, out_shardings=shardings)(rng), shardings
