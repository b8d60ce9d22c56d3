"""Multi-device checks that test_sharding.py runs in a separate process.

Fake CPU devices exist only when XLA_FLAGS contains
--xla_force_host_platform_device_count=N before JAX starts, so the test starts
this script with that variable set and compares the .npz files it writes:

  python tests/sharding_worker.py steps --config_dir DIR --out DIR
  python tests/sharding_worker.py restore --config_dir DIR --checkpoint_workdir DIR --out DIR

`steps` (8 devices) runs one training step of every task in DIR/*.json on each
mesh of --meshes, the masking draws and the deterministic sampler on one and
on all devices, and saves a checkpoint from --checkpoint_mesh. `restore`
restores that checkpoint onto each mesh of --meshes. Every mesh uses the first
prod(shape) devices of the process.
"""

import argparse
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcd_jax import checkpointing
from mcd_jax import diffusion
from mcd_jax import experiment
from mcd_jax import sampling
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import train_state as train_state_lib
from mcd_jax import workdir as workdir_lib
from mcd_jax.distill import rounds


def parse_meshes(text: str) -> list[tuple[int, ...]]:
  """Parses '1,1,1;8,1,1' into [(1, 1, 1), (8, 1, 1)]."""
  return [tuple(int(size) for size in shape.split(',')) for shape in text.split(';')]


def mesh_name(shape) -> str:
  return 'x'.join(str(size) for size in shape)


def mesh_over_first_devices(shape) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over the first prod(shape) devices."""
  return sharding.create_mesh(shape, jax.devices()[:int(np.prod(shape))])


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  """Host copies of the leaves of `tree`, keyed by prefix and tree path."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def count_sharded(tree) -> int:
  """The number of arrays in `tree` that are split over more than one device."""
  return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree))


def state_shardings(state):
  return jax.tree_util.tree_map(lambda leaf: leaf.sharding, state)


def load_config(path: str) -> ml_collections.ConfigDict:
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


# ----------------------------------------------------------------------------
# One training step.


def one_step(run, mesh, host_batch, host_teacher):
  """Creates the state on `mesh` and runs one step as the trainer does.

  Returns the new state, the step's metrics and host copies of the initial
  parameters (the step donates the state's buffers).
  """
  config = run.config
  rules = config.mesh.axis_rules
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  init_rng, train_rng, _, _ = jax.random.split(jax.random.key(config.seed), 4)
  state, state_shardings = train_state_lib.create_state(
      run.model, tx, init_rng, mesh, rules, config.data.seq_len)

  teacher, teacher_shardings, delta = None, None, 0.0
  if config.task == 'distill':
    teacher_shardings = state_shardings.params
    teacher = jax.device_put(host_teacher, teacher_shardings)
    student = jax.device_put(host_teacher, teacher_shardings)
    state = state.replace(params=student, ema_params=jax.tree_util.tree_map(jnp.copy, student))
    state = jax.device_put(state, state_shardings)
    schedule_of_rounds = rounds.RoundSchedule(
        config.distill.base_steps, config.distill.num_rounds, config.distill.steps_per_round)
    delta = schedule_of_rounds.delta(0)

  train_step = train.make_train_step(run.objective, tx, config.optim.ema_rate,
                                     state_shardings, sharding.batch_sharding(mesh),
                                     teacher_shardings, mesh)
  batch = sharding.global_batch_from_local(host_batch, mesh)
  initial_params = flatten(state.params, 'initial.params')
  state, step_metrics = train_step(state, batch, train_rng, teacher, jnp.float32(delta))
  return state, step_metrics, initial_params


def masks_and_times(run, mesh, host_batch) -> dict[str, np.ndarray]:
  """Draws the training times t and z_t ~ q(z_t | x) under a batch-sharded jit."""
  batch_sharding = sharding.batch_sharding(mesh)
  mask_id = run.datasets.tokenizer.vocab_size

  def draw(rng, tokens):
    time_rng, noise_rng = jax.random.split(rng)
    t = diffusion.sample_times(time_rng, tokens.shape[0])
    return t, diffusion.corrupt(noise_rng, tokens, t, run.schedule, mask_id)

  jitted = jax.jit(draw, in_shardings=(sharding.replicated(mesh), batch_sharding),
                   out_shardings=(batch_sharding, batch_sharding))
  t, z_t = jitted(jax.random.key(run.config.seed),
                  sharding.global_batch_from_local(host_batch, mesh))
  return {'t': np.asarray(t), 'z_t': np.asarray(z_t)}


def deterministic_tokens(run, mesh, host_params, num_samples: int) -> np.ndarray:
  """Deterministic samples with the batch (the sample indices) sharded over data."""
  config = run.config
  param_shardings = train_state_lib.abstract_state_and_shardings(
      run.model, train_state_lib.make_optimizer(config.optim, 1), mesh,
      config.mesh.axis_rules, config.data.seq_len)[1].params
  batch_sharding = sharding.batch_sharding(mesh)

  def sample(params, key, sample_indices):
    return sampling.deterministic_sample(
        run.model, params, key, batch_size=num_samples, seq_len=config.data.seq_len,
        num_steps=config.sampling.num_steps, schedule=run.schedule,
        mask_id=run.datasets.tokenizer.vocab_size, sample_indices=sample_indices,
        time_conditioned=config.model.time_conditioning, return_nfe=False)

  jitted = jax.jit(sample, in_shardings=(param_shardings, sharding.replicated(mesh),
                                         batch_sharding),
                   out_shardings=batch_sharding)
  indices = jax.device_put(np.arange(num_samples, dtype=np.int32), batch_sharding)
  tokens = jitted(jax.device_put(host_params, param_shardings), jax.random.key(7), indices)
  return np.asarray(tokens)


def run_steps(args) -> None:
  meshes = parse_meshes(args.meshes)
  checkpoint_mesh = parse_meshes(args.checkpoint_mesh)[0]
  summary = {'device_count': jax.device_count(), 'tasks': {}}

  for path in sorted(glob.glob(os.path.join(args.config_dir, '*.json'))):
    task_name = os.path.splitext(os.path.basename(path))[0]
    config = load_config(path)
    # The mesh of `setup` spans every device; each check below builds its own.
    run = experiment.setup(config, os.path.join(args.out, 'workdirs', task_name))
    host_batch = next(run.datasets.train_iterator)
    host_teacher = jax.device_get(run.initial_teacher_params)
    run.initial_teacher_params = None
    summary['tasks'][task_name] = {}

    for shape in meshes:
      mesh = mesh_over_first_devices(shape)
      state, step_metrics, arrays = one_step(run, mesh, host_batch, host_teacher)
      arrays.update(flatten(state, 'state'))
      arrays.update(flatten(step_metrics, 'metrics'))
      np.savez(os.path.join(args.out, f'{task_name}_{mesh_name(shape)}.npz'), **arrays)
      summary['tasks'][task_name][mesh_name(shape)] = {
          'sharded_params': count_sharded(state.params),
          'devices': int(mesh.devices.size)}
      if mesh.devices.size == jax.device_count():
        # The trainer's estimate assumes a mesh over all devices.
        estimate_config = ml_collections.ConfigDict(config.to_dict())
        estimate_config.mesh.shape = shape
        estimate = experiment.memory_estimate(estimate_config, state, state_shardings(state),
                                              has_teacher=task_name == 'distill')
        summary['tasks'][task_name][mesh_name(shape)]['activation_bytes'] = (
            estimate['activations'])

      if task_name == 'diffusion' and shape == checkpoint_mesh:
        save_checkpoint(run, state, args.out)

    if task_name == 'diffusion':
      # Masks, times and samples on one device and on all devices.
      for shape in ((1, 1, 1), (jax.device_count(), 1, 1)):
        mesh = mesh_over_first_devices(shape)
        arrays = masks_and_times(run, mesh, host_batch)
        arrays['tokens'] = deterministic_tokens(
            run, mesh, jax.device_get(state.params), num_samples=jax.device_count())
        np.savez(os.path.join(args.out, f'draws_{mesh_name(shape)}.npz'), **arrays)

  with open(os.path.join(args.out, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)


# ----------------------------------------------------------------------------
# Checkpoints across meshes.


def save_checkpoint(run, state, out: str) -> None:
  """Saves `state` as step 1 of OUT/checkpoint and its host copy as saved_state.npz."""
  workdir = os.path.join(out, 'checkpoint')
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), keep=1)
  checkpointing.save(manager, 1, state, run.datasets.train_iterator.get_state(), run.meta,
                     force=True)
  np.savez(os.path.join(out, 'saved_state.npz'), **flatten(state, 'state'))
  np.savez(os.path.join(out, 'saved_sharding.npz'),
           sharded_params=count_sharded(state.params))


def run_restore(args) -> None:
  config = load_config(os.path.join(args.config_dir, 'diffusion.json'))
  manager = checkpointing.make_manager(
      workdir_lib.checkpoint_dir(args.checkpoint_workdir), keep=1)
  meta = checkpointing.read_meta(manager)
  model = experiment.build_model(config, meta['vocab_size'])
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  summary = {'device_count': jax.device_count(), 'meshes': {}}

  for shape in parse_meshes(args.meshes):
    mesh = mesh_over_first_devices(shape)
    abstract_state, _ = train_state_lib.abstract_state_and_shardings(
        model, tx, mesh, config.mesh.axis_rules, config.data.seq_len)
    restored = checkpointing.restore(manager, abstract_state)
    state = restored['state']
    np.savez(os.path.join(args.out, f'restored_{mesh_name(shape)}.npz'),
             **flatten(state, 'state'))
    devices = {device.id for leaf in jax.tree_util.tree_leaves(state)
               for device in leaf.sharding.device_set}
    summary['meshes'][mesh_name(shape)] = {
        'step': restored['step'], 'devices': sorted(devices),
        'sharded_params': count_sharded(state.params)}

  with open(os.path.join(args.out, 'restore_summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('command', choices=('steps', 'restore'))
  parser.add_argument('--config_dir', required=True,
                      help='Folder with one config JSON per task (diffusion.json, ...).')
  parser.add_argument('--out', required=True, help='Folder for the .npz and .json results.')
  parser.add_argument('--meshes', default='1,1,1;8,1,1;2,2,2;1,8,1',
                      help='Mesh shapes (data,fsdp,tensor), separated by semicolons.')
  parser.add_argument('--checkpoint_mesh', default='1,8,1',
                      help='The mesh whose diffusion state `steps` saves.')
  parser.add_argument('--checkpoint_workdir', help='The workdir `restore` reads.')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.command == 'steps':
    run_steps(args)
  else:
    run_restore(args)


if __name__ == '__main__':
  main()
