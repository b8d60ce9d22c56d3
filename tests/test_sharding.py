"""Sharding invariance: one CPU device and 8 fake devices train, draw and restore alike.

JAX creates fake CPU devices only from XLA_FLAGS read at start-up, so
tests/sharding_worker.py runs the multi-device parts in subprocesses and this
file compares what they write. Steps, draws and samples are compared with the
mesh (1, 1, 1) over one device of the same process, restored checkpoints with
the state that was saved.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mcd_jax import sharding
from mcd_jax import train
from test_train import load_config
from test_train import tiny_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sharding_worker.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDED_MESHES = ('8x1x1', '2x2x2', '1x8x1')
RESTORE_MESHES = ('1x1x1', '1x2x1', '1x2x2')
WORKER_TIMEOUT_S = 600

# Float32 sums in another order (per-device partial sums, then an all-reduce)
# change a result by about 1e-7 times the sum of the absolute summands. So an
# array is compared against the scale of its largest entry, not entry by
# entry: the worst observed difference was 1e-6 of that scale. Adam's first
# step divides each gradient entry by |g| + 1e-8, which magnifies that error up
# to lr / 1e-8 times for entries with |g| near 1e-8, so updated parameters get
# a wider tolerance (observed: 5e-6 of the scale). Another batch row, mask or
# time would change them by about lr, 1e-3 of their scale. Metrics are O(1)
# scalars and use a plain relative tolerance.
RTOL, ATOL = 1e-5, 1e-6
SCALE_TOL = 1e-5
PARAMS_SCALE_TOL = 1e-4


def run_worker(args: list[str], num_devices: int, log_path, cache_dir) -> None:
  """Runs sharding_worker.py with `num_devices` fake CPU devices; fails on an error."""
  env = dict(os.environ)
  # Optimization level 0 of the CPU backend cut the compile time of a train
  # step by about 40% in one run on 2 shared cores. It applies to every mesh
  # alike, after SPMD partitioning.
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={num_devices} '
                      '--xla_backend_optimization_level=0')
  env['JAX_PLATFORMS'] = 'cpu'
  # The diffusion and distill states share one architecture: a persistent
  # cache compiles their initialisation once per mesh.
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  with open(log_path, 'w', encoding='utf-8') as log:
    completed = subprocess.run([sys.executable, WORKER] + args, env=env, stdout=log,
                               stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S,
                               check=False)
  if completed.returncode != 0:
    with open(log_path, encoding='utf-8') as log:
      tail = log.read()[-4000:]
    pytest.fail(f'{os.path.basename(WORKER)} {args[0]} failed with exit code '
                f'{completed.returncode}:\n{tail}')


def step_config():
  """The tiny teacher config, with a batch that every mesh divides and no warmup.

  Without warmup the first step moves the parameters, so the comparison
  covers the update and not only the initialisation.
  """
  config = tiny_config(num_steps=1)
  config.data.batch_size = 8  # data x fsdp is 1, 8, 4 and 8 on the four meshes.
  config.model.num_layers = 1
  config.optim.warmup_steps = 0
  config.train.eval_batches = 1
  return config


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Trains a tiny teacher here, then runs both workers; returns their output folder."""
  base = tmp_path_factory.mktemp('sharding')
  teacher_workdir = str(base / 'teacher')
  train.train_and_evaluate(step_config(), teacher_workdir)

  config_dir = base / 'configs'
  config_dir.mkdir()
  (config_dir / 'diffusion.json').write_text(step_config().to_json())
  distill = load_config('mcd_bible_char')
  distill.distill.teacher_workdir = teacher_workdir
  distill.data.batch_size = 8
  distill.optim.warmup_steps = 0
  (config_dir / 'distill.json').write_text(distill.to_json())

  out = base / 'out'
  run_worker(['steps', '--config_dir', str(config_dir), '--out', str(out),
              '--meshes', '1,1,1;8,1,1;2,2,2;1,8,1', '--checkpoint_mesh', '1,8,1'],
             num_devices=8, log_path=base / 'steps.log', cache_dir=base / 'cache')
  # Only 4 devices exist in this process, so the 8-device layout saved in the
  # checkpoint cannot be reused: Orbax must reshard onto the new meshes.
  run_worker(['restore', '--config_dir', str(config_dir), '--out', str(out),
              '--checkpoint_workdir', str(out / 'checkpoint'),
              '--meshes', '1,1,1;1,2,1;1,2,2'],
             num_devices=4, log_path=base / 'restore.log', cache_dir=base / 'cache')
  return out


def load_npz(path) -> dict[str, np.ndarray]:
  with np.load(path) as arrays:
    return {name: arrays[name] for name in arrays.files}


def assert_same_arrays(expected: dict, actual: dict) -> None:
  """Compares float arrays to the scale of their largest entry, the rest exactly."""
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    if not np.issubdtype(value.dtype, np.floating):
      np.testing.assert_array_equal(actual[name], value, err_msg=name)
    elif name.startswith('metrics'):
      np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    else:
      tolerance = PARAMS_SCALE_TOL if name.startswith('state.params') else SCALE_TOL
      scale = float(np.max(np.abs(value))) if value.size else 0.0
      np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=tolerance * scale,
                                 err_msg=name)

def test_mesh_over_device_subset():
  # The worker builds every mesh over the first prod(shape) devices.
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(sharding.ShardingError, match='uses 8 devices but 4 are available'):
    sharding.create_mesh((2, 2, 2), devices=jax.devices()[:1] * 4)


@pytest.mark.slow
@pytest.mark.parametrize('task', ['diffusion', 'distill'])
@pytest.mark.parametrize('mesh', SHARDED_MESHES)
def test_step_matches_one_device(results, task, mesh):
  reference = load_npz(results / f'{task}_1x1x1.npz')
  sharded = load_npz(results / f'{task}_{mesh}.npz')

  losses = [name for name in reference if name.startswith('metrics') and 'loss' in name]
  assert losses, sorted(reference)
  assert_same_arrays(reference, sharded)


@pytest.mark.slow
@pytest.mark.parametrize('task', ['diffusion', 'distill'])
def test_step_changes_parameters(results, task):
  # Guards the comparison above against a step that leaves the state as it was.
  arrays = load_npz(results / f'{task}_1x1x1.npz')
  names = [name for name in arrays if name.startswith('initial.params')]
  assert names
  changed = [name for name in names
             if not np.allclose(arrays[name], arrays[name.replace('initial.', 'state.', 1)],
                                rtol=0, atol=10 * ATOL)]
  assert len(changed) > len(names) // 2, (len(changed), len(names))
  assert arrays['state.step'] == 1


@pytest.mark.slow
@pytest.mark.parametrize('task', ['diffusion', 'distill'])
def test_meshes_split_the_state(results, task):
  summary = json.loads((results / 'summary.json').read_text())['tasks'][task]

  assert summary['1x1x1'] == {'sharded_params': 0, 'devices': 1}
  assert summary['8x1x1']['sharded_params'] == 0
  assert summary['8x1x1']['devices'] == 8
  assert summary['2x2x2']['devices'] == 8
  assert summary['2x2x2']['sharded_params'] > 0
  assert summary['1x8x1']['devices'] == 8
  assert summary['1x8x1']['sharded_params'] > 0


@pytest.mark.slow
@pytest.mark.parametrize('task', ['diffusion', 'distill'])
def test_activation_estimate_per_device_batch(results, task):
  # 8 rows over data x fsdp = 8, 4 and 8 devices: 1, 2 and 1 rows per device.
  summary = json.loads((results / 'summary.json').read_text())['tasks'][task]
  one_row = summary['8x1x1']['activation_bytes']

  assert one_row > 0
  assert summary['1x8x1']['activation_bytes'] == one_row
  assert summary['2x2x2']['activation_bytes'] == 2 * one_row


@pytest.mark.slow
def test_masks_and_times_match(results):
  one = load_npz(results / 'draws_1x1x1.npz')
  eight = load_npz(results / 'draws_8x1x1.npz')

  np.testing.assert_array_equal(eight['t'], one['t'])
  np.testing.assert_array_equal(eight['z_t'], one['z_t'])
  # Every row has its own time, so a draw repeated per device would show.
  assert len(np.unique(one['t'])) == len(one['t'])


@pytest.mark.slow
def test_deterministic_sampler_matches(results):
  one = load_npz(results / 'draws_1x1x1.npz')['tokens']
  eight = load_npz(results / 'draws_8x1x1.npz')['tokens']

  assert one.shape == (8, 16)
  np.testing.assert_array_equal(eight, one)
  # Sample b uses the noise of index b: identical rows would mean shared noise.
  assert len({row.tobytes() for row in one}) == len(one)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', RESTORE_MESHES)
def test_checkpoint_restores_on_fewer_devices(results, mesh):
  saved = load_npz(results / 'saved_state.npz')
  restored = load_npz(results / f'restored_{mesh}.npz')
  summary = json.loads((results / 'restore_summary.json').read_text())

  assert sorted(restored) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
  num_devices = int(np.prod([int(size) for size in mesh.split('x')]))
  assert summary['device_count'] == 4
  assert summary['meshes'][mesh]['devices'] == list(range(num_devices))
  assert summary['meshes'][mesh]['step'] == 1


@pytest.mark.slow
def test_saved_checkpoint_was_sharded(results):
  # The restore above reshards only if the saved arrays were split over devices.
  assert int(load_npz(results / 'saved_sharding.npz')['sharded_params']) > 0
