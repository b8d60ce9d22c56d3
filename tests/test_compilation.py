"""Compilation and transfer checks: the hot paths compile once and stay on device.

Compilations are counted with the '/jax/core/compile/backend_compile_duration'
monitoring event, which JAX records once per XLA compilation (jax 0.10.2,
jax/_src/dispatch.py). A cache hit records nothing.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax import config_base
from mcd_jax import decoding
from mcd_jax import experiment
from mcd_jax import objectives
from mcd_jax import sampling
from mcd_jax import schedules
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import train_state as train_state_lib
from mcd_jax.models import transformer

BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
K = 7
BATCH = 2
LENGTH = 8


@contextlib.contextmanager
def count_compiles():
  """Yields a list that receives one entry per XLA compilation inside the block."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def tiny_model(causal=False):
  return transformer.Transformer(
      vocab_size=K if causal else K + 1, output_size=K, d_model=16, num_layers=1,
      num_heads=2, mlp_dim=32, causal=causal)


def init_params(model):
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(0), tokens, None)['params'])


@pytest.mark.parametrize('sampler', ['ancestral', 'deterministic'])
def test_sampler_compiles_once_per_shape(sampler):
  model = tiny_model()
  params = init_params(model)
  sample = sampling.make_sample_fn(
      model, sampler=sampler, batch_size=BATCH, seq_len=LENGTH, num_steps=4,
      schedule='loglinear', mask_id=K, time_conditioned=False)

  with count_compiles() as first:
    jax.block_until_ready(sample(params, jax.random.key(0)))
  with count_compiles() as repeated:
    for seed in range(1, 4):
      jax.block_until_ready(sample(params, jax.random.key(seed), temperature=0.5 + seed))
  with count_compiles() as new_shape:
    jax.block_until_ready(sample(params, jax.random.key(0), batch_size=BATCH + 1))

  assert len(first) >= 1
  assert repeated == []
  # A new batch size is a new shape, so the counter must see a compilation.
  assert len(new_shape) >= 1


def test_decoding_compiles_once_per_shape():
  model = tiny_model(causal=True)
  params = init_params(model)
  prompt = jnp.zeros((BATCH, 1), jnp.int32)

  with count_compiles() as first:
    jax.block_until_ready(decoding.sample(model, params, jax.random.key(0), prompt,
                                          seq_len=LENGTH))
  with count_compiles() as repeated:
    for seed in range(1, 4):
      longer_prompt = np.full((BATCH, seed), seed, np.int32)  # NumPy: no compile here.
      jax.block_until_ready(decoding.sample(model, params, jax.random.key(seed),
                                            longer_prompt, seq_len=LENGTH))

  assert len(first) >= 1
  assert repeated == []


@pytest.fixture(scope='module')
def distill_step():
  """The MCD train step built as the trainer builds it, with its state and batch.

  Both train-step tests share one compiled step. The state is donated, so a
  test stores the state it ends with back in the returned dict.
  """
  config = config_base.base_config()
  config.task = 'distill'
  config.data.seq_len = LENGTH
  config.data.batch_size = BATCH
  config.model.d_model = 16
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  mesh = sharding.create_mesh((-1, 1, 1))
  model = experiment.build_model(config, K)
  schedule = schedules.get_schedule(config.diffusion.schedule)
  objective = objectives.make_objective(config, model, schedule, K)
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  state, shardings = train_state_lib.create_state(model, tx, jax.random.key(0), mesh,
                                                  config.mesh.axis_rules, LENGTH)
  step = train.make_train_step(objective, tx, config.optim.ema_rate, shardings,
                               sharding.batch_sharding(mesh), shardings.params, mesh)
  tokens = jax.device_put(jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, K),
                          sharding.batch_sharding(mesh))
  return {'step': step, 'state': state, 'tokens': tokens}


def test_train_step_compiles_once_across_rounds(distill_step):
  step, state, tokens = distill_step['step'], distill_step['state'], distill_step['tokens']
  rng = jax.random.key(2)
  teacher = jax.tree_util.tree_map(jnp.copy, state.params)
  deltas = [jnp.float32(1 / 16), jnp.float32(1 / 8), jnp.float32(1 / 4)]

  with count_compiles() as first:
    state, _ = step(state, tokens, rng, teacher, deltas[0])
    jax.block_until_ready(state)
  with count_compiles() as later:
    for delta in deltas:
      # A new round: the student becomes the teacher and Δ doubles.
      teacher = jax.tree_util.tree_map(jnp.copy, state.params)
      for _ in range(2):
        state, _ = step(state, tokens, rng, teacher, delta)
    jax.block_until_ready(state)

  assert len(first) >= 1
  distill_step['state'] = state
  # The teacher copies were compiled before `first`, so any compilation here
  # is a retrace of the step for a new Δ or a new teacher.
  assert later == []


def test_train_step_has_no_host_transfer(distill_step):
  step, state, tokens = distill_step['step'], distill_step['state'], distill_step['tokens']
  rng = jax.random.key(2)
  teacher = jax.tree_util.tree_map(jnp.copy, state.params)
  delta = jnp.float32(1 / 8)
  state, _ = step(state, tokens, rng, teacher, delta)  # Compiles outside the guard if needed.
  jax.block_until_ready(state)
  start = int(state.step)

  with jax.transfer_guard('disallow'):
    # The guard is active: a host scalar passed to a jitted function is rejected.
    with pytest.raises(Exception, match='host-to-device'):
      jax.jit(lambda x: x + 1)(np.float32(1.0))
    for _ in range(3):
      state, metrics = step(state, tokens, rng, teacher, delta)
    jax.block_until_ready((state, metrics))

  distill_step['state'] = state
  assert int(state.step) == start + 3
