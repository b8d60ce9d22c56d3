"""Package-wide checks: imports start no backend, launches refuse the wrong platform,
and the remaining benchmark scripts run in their smoke modes."""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import mcd_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_module_names() -> list[str]:
  names = ['mcd_jax']
  for module in pkgutil.walk_packages(mcd_jax.__path__, prefix='mcd_jax.'):
    names.append(module.name)
  return sorted(names)


def test_every_module_is_listed():
  names = all_module_names()

  for expected in ('mcd_jax.train', 'mcd_jax.duality', 'mcd_jax.sampling',
                   'mcd_jax.distill.mcd', 'mcd_jax.data.pipeline', 'mcd_jax.main'):
    assert expected in names


def test_importing_every_module_starts_no_backend():
  # Multi-host runs call jax.distributed.initialize first; an import that
  # touched a backend before that would make it fail.
  imports = '\n'.join(f'import {name}' for name in all_module_names())
  code = (f'{imports}\n'
          'from jax._src import xla_bridge\n'
          'assert not xla_bridge.backends_are_initialized(), "a backend was initialised"\n')

  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=False, cwd=REPO)

  assert result.returncode == 0, result.stderr[-3000:]


def run_main(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'mcd_jax.main', *args], capture_output=True,
                        text=True, check=False, cwd=REPO, env=env, timeout=300)


def test_wrong_platform_stops_launch(tmp_path):
  # On this CPU-only machine a GPU launch must stop, not fall back to the CPU.
  result = run_main('--config', 'configs/bible_char.py:smoke', '--workdir',
                    str(tmp_path / 'run'), '--platform=gpu')

  assert result.returncode == 1
  assert "--platform=gpu was requested but JAX runs on 'cpu'" in result.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_too_few_devices_stops_launch(tmp_path):
  result = run_main('--config', 'configs/bible_char.py:smoke', '--workdir',
                    str(tmp_path / 'run'), '--min_devices=4')

  assert result.returncode == 1
  assert '--min_devices=4 but only 1 cpu devices were found' in result.stderr


@pytest.mark.slow
def test_duality_cost_smoke(tmp_path):
  output = tmp_path / 'duality.json'

  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'duality_cost.py'),
                           '--smoke', '--output', str(output)], capture_output=True, text=True,
                          check=False, cwd=REPO, timeout=300)

  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['ratio_full_over_reduced'] > 1.0


@pytest.mark.slow
def test_exact_trained_smoke(tmp_path):
  output = tmp_path / 'exact.json'
  env = dict(os.environ, PYTHONPATH=REPO)

  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'exact_trained.py'),
                           '--smoke', '--output', str(output)], capture_output=True, text=True,
                          check=False, cwd=REPO, env=env, timeout=600)

  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(output.read_text(encoding='utf-8'))
  assert [row['steps'] for row in report['rows']] == [4, 2, 1]
  for row in report['rows']:
    for key in ('teacher_kl', 'mcd_data_kl', 'mcd_teacher_kl', 'sdtt_kl'):
      assert row[key] >= 0.0, key
