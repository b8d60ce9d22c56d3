"""Two `jax.distributed` processes on localhost train like one, and one process resumes them.

Each process of the command line gets 2 fake CPU devices, so the run's mesh
is (4, 1, 1) over 2 hosts, with Gloo CPU collectives (the default of
jax_cpu_collectives_implementation in jax 0.10). The coordinator listens on
127.0.0.1 only.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from mcd_jax import checkpointing
from mcd_jax import experiment
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import train_state as train_state_lib
from mcd_jax import workdir as workdir_lib
from test_train import load_config
from test_train import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, 'configs', 'bible_char.py')
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 480

# The tiny run: both the command line (as --config.KEY=VALUE) and the
# in-process reference apply these to configs/bible_char.py:smoke.
OVERRIDES = {
    'data.max_chars': 60_000,
    'data.seq_len': 16,
    'data.batch_size': 4,  # 2 rows per process, 1 per device.
    'model.d_model': 32,
    'model.num_layers': 1,
    'model.mlp_dim': 64,
    'optim.warmup_steps': 0,
    'train.num_steps': 4,
    'train.log_every': 2,
    'train.checkpoint_every': 2,
    'train.eval_batches': 1,
    'sampling.num_steps': 4,
    'sampling.num_samples': 2,
    'sampling.batch_size': 2,
}

# Float32 results of 4 devices and of 1 device differ in the summation order
# only. Metrics are compared entry by entry; parameters against the scale of
# each array, because Adam divides every gradient entry by |g| + 1e-8 and so
# magnifies the rounding error of entries with |g| near 1e-8 (see
# test_sharding.py for the measured sizes).
RTOL, ATOL = 1e-5, 1e-6
PARAMS_SCALE_TOL = 1e-4


def main_command(workdir: str, overrides: dict, *flags: str) -> list[str]:
  command = [sys.executable, '-m', 'mcd_jax.main', f'--config={CONFIG_FILE}:smoke',
             f'--workdir={workdir}']
  command += [f'--config.{key}={value}' for key, value in overrides.items()]
  return command + list(flags)


def cpu_env(num_devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  return env


def run_processes(commands: list[list[str]], env: dict, log_dir) -> list[str]:
  """Runs `commands` at once; returns their logs, or fails when any exits non-zero."""
  logs = [open(log_dir / f'process_{index}.log', 'w+', encoding='utf-8')
          for index in range(len(commands))]
  processes = [subprocess.Popen(command, env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
               for command, log in zip(commands, logs)]
  try:
    for process in processes:
      process.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    # One failed process leaves the other waiting on a collective: stop it.
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  for index, (process, text) in enumerate(zip(processes, texts)):
    if process.returncode != 0:
      pytest.fail(f'Process {index} exited with code {process.returncode} (negative: '
                  f'killed after {TIMEOUT_S} s or by a signal):\n{text[-4000:]}')
  return texts


def reference_config():
  config = load_config('bible_char')
  for key, value in OVERRIDES.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def restore_params(workdir: str):
  """The step-4 parameters of `workdir` on this process's one device."""
  config = workdir_lib.load_config(workdir)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), keep=10)
  meta = checkpointing.read_meta(manager, step=4)
  model = experiment.build_model(config, meta['vocab_size'])
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  abstract_state, _ = train_state_lib.abstract_state_and_shardings(
      model, tx, mesh, config.mesh.axis_rules, config.data.seq_len)
  state = checkpointing.restore(manager, abstract_state, step=4)['state']
  return jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """Trains 4 steps with 2 processes; returns (workdir, the two logs)."""
  base = tmp_path_factory.mktemp('multihost')
  workdir = str(base / 'run')
  port = portpicker.pick_unused_port()
  commands = [
      main_command(workdir, OVERRIDES, f'--coordinator_address=127.0.0.1:{port}',
                   f'--num_processes={NUM_PROCESSES}', f'--process_id={index}')
      for index in range(NUM_PROCESSES)]
  logs = run_processes(commands, cpu_env(DEVICES_PER_PROCESS), base)
  return workdir, logs


@pytest.mark.slow
def test_processes_form_one_mesh(two_process_run):
  _, logs = two_process_run

  for index, log in enumerate(logs):
    assert f'jax.distributed: process {index} of {NUM_PROCESSES}' in log
    assert "Mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices" in log


@pytest.mark.slow
def test_only_process_zero_writes(two_process_run):
  workdir, (log_0, log_1) = two_process_run

  records = read_metrics(workdir)
  train_steps = [record['step'] for record in records if 'loss' in record]
  eval_steps = [record['step'] for record in records if 'val_elbo_bits_per_token' in record]
  assert train_steps == [2, 4]  # One line per logging step, not one per process.
  assert eval_steps == [4]
  assert sorted(os.listdir(workdir_lib.samples_dir(workdir))) == ['step_4.jsonl', 'step_4.txt']
  with open(os.path.join(workdir_lib.samples_dir(workdir), 'step_4.jsonl'),
            encoding='utf-8') as f:
    assert len(f.readlines()) == OVERRIDES['sampling.num_samples']
  assert 'Wrote 2 samples' in log_0
  assert 'Wrote 2 samples' not in log_1
  assert 'Run finished' in log_0
  assert 'Run finished' not in log_1


@pytest.mark.slow
def test_two_processes_match_one(two_process_run, tmp_path):
  workdir, _ = two_process_run
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(reference_config(), reference)

  expected, actual = read_metrics(reference), read_metrics(workdir)
  assert [record['step'] for record in actual] == [record['step'] for record in expected]
  for want, got in zip(expected, actual):
    for name in ('loss', 'grad_norm', 'bits_per_token', 'val_elbo_bits_per_token'):
      if name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f'{name} at step {want["step"]}')

  expected_params, actual_params = restore_params(reference), restore_params(workdir)
  assert [path for path, _ in actual_params] == [path for path, _ in expected_params]
  for (path, want), (_, got) in zip(expected_params, actual_params):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=PARAMS_SCALE_TOL * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_one_process_resumes(two_process_run, tmp_path):
  source, _ = two_process_run
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(source, workdir)
  longer = dict(OVERRIDES, **{'train.num_steps': 6})

  # A longer run changes the learning-rate decay, so the resume must allow it.
  (log,) = run_processes([main_command(workdir, longer, '--allow_config_change')],
                         cpu_env(1), tmp_path)

  assert 'Resuming diffusion at step 4' in log
  assert "Mesh {'data': 1, 'fsdp': 1, 'tensor': 1} over 1 devices" in log
  train_steps = [record['step'] for record in read_metrics(workdir) if 'loss' in record]
  assert train_steps == [2, 4, 6]
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), keep=10)
  assert manager.latest_step() == 6
  assert os.path.exists(os.path.join(workdir_lib.samples_dir(workdir), 'step_6.txt'))
