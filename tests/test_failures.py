"""Failure handling: every bad input gives one `error:` line, and runs survive crashes.

Most tests run the real command line (`python -m mcd_jax.main`) in a subprocess
and check three things: a non-zero exit status, exactly one stderr line that
starts with `error:` and names the value and the fix, and no Python traceback.
The crash tests kill a training subprocess with SIGKILL or SIGTERM and check
that rerunning the same command ends with the parameters of an uninterrupted
run. All runs use a one-layer model with d_model 32 on 16-token sequences.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mcd_jax import checkpointing
from mcd_jax import config_base
from mcd_jax import experiment
from mcd_jax import inference
from mcd_jax import train
from mcd_jax import workdir as workdir_lib
from mcd_jax.data import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The config file that every command-line test passes to --config.
TINY_CONFIG = '''\
"""A one-layer model on the first 60,000 characters of the Bible."""
from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.data.max_chars = 60_000
  config.data.seq_len = 16
  config.data.batch_size = 4
  config.model.d_model = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.optim.warmup_steps = 2
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.eval_every = 1000
  config.train.eval_batches = 1
  config.train.checkpoint_every = 2
  config.sampling.num_steps = 4
  config.sampling.num_samples = 2
  config.sampling.batch_size = 2
  if arg == 'crash':  # 16 steps with a checkpoint after each, for the kill tests.
    config.train.num_steps = 16
    config.train.log_every = 4
    config.train.checkpoint_every = 1
    config.train.keep_checkpoints = 2
  return config
'''


# ---- Helpers ----


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('configs') / 'tiny.py'
  path.write_text(TINY_CONFIG)
  return str(path)


def tiny_config(arg=None):
  namespace = {}
  exec(compile(TINY_CONFIG, 'tiny.py', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['get_config'](arg)


def cli_env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)  # One CPU device, so mesh sizes are predictable.
  return env


def cli_command(*args):
  return [sys.executable, '-m', 'mcd_jax.main', *args]


def run_cli(*args, timeout=180):
  return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True,
                        text=True, timeout=timeout, check=False)


def error_line(result, *fragments):
  """Checks the exit status and the single `error:` line; returns that line."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def listing(workdir):
  """Maps every file under DIR/checkpoints to (size, mtime_ns)."""
  files = {}
  for root, _, names in os.walk(workdir_lib.checkpoint_dir(workdir)):
    for name in names:
      path = os.path.join(root, name)
      stat = os.stat(path)
      files[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns)
  return files


def checkpoint_steps(workdir):
  directory = workdir_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def final_params(workdir):
  return jax.tree_util.tree_leaves(jax.device_get(
      inference.load(workdir, use_ema=False).params))


def assert_same_params(expected, actual):
  assert len(expected) == len(actual)
  for left, right in zip(expected, actual):
    np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-7)


def largest_state_file(workdir, step):
  """The biggest array file of a step: it contains parameter values, not metadata."""
  state = os.path.join(workdir_lib.checkpoint_dir(workdir), str(step), 'state')
  files = [os.path.join(root, name) for root, _, names in os.walk(state) for name in names]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step teacher (checkpoints 2 and 4), trained through the Python API."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'teacher')
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture
def trained_copy(trained, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained, workdir)
  return workdir


# ---- Command line: help and usage ----


def test_help_lists_modes_and_configs():
  result = run_cli('--help')

  assert result.returncode == 0, result.stderr
  for mode in ('train', 'evaluate', 'sample', 'pipeline'):
    assert mode in result.stdout
  for name in ('bible_char.py', 'mcd_bible_char.py', 'owt_gpt2_small.py'):
    assert name in result.stdout


@pytest.mark.parametrize('args, missing', [
    (('--config', 'configs/bible_char.py'), '--workdir is missing'),
    (('--workdir', '/tmp/unused'), '--config is missing'),
    ((), '--config and --workdir are missing'),
])
def test_missing_flag_is_usage_error(args, missing):
  result = run_cli(*args)

  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert missing in result.stderr
  assert 'bible_char.py' in result.stderr  # The shipped configs are listed.


# ---- Command line: config errors ----


def write_config(tmp_path, body):
  path = tmp_path / 'config.py'
  path.write_text('from mcd_jax import config_base\n\n\ndef get_config(arg=None):\n'
                  '  config = config_base.base_config()\n' + body + '  return config\n')
  return str(path)


def test_unknown_override_suggests_key(config_file, tmp_path):
  result = run_cli('--config', config_file, '--workdir', str(tmp_path / 'w'),
                   '--config.train.num_stepz=3')

  error_line(result, '--config.train.num_stepz', "Did you mean 'train.num_steps'?")
  assert not os.path.exists(tmp_path / 'w')


def test_unknown_key_in_file_suggests_key(tmp_path):
  path = write_config(tmp_path, '  config.optim.learning_rat = 0.1\n')

  result = run_cli('--config', path, '--workdir', str(tmp_path / 'w'))

  error_line(result, "'optim.learning_rat'", "Did you mean 'optim.learning_rate'?")


def test_misspelt_section_in_file_names_line(tmp_path):
  path = write_config(tmp_path, '  config.trian.num_steps = 3\n')

  result = run_cli('--config', path, '--workdir', str(tmp_path / 'w'))

  error_line(result, 'AttributeError', f'{path} line 6', 'trian', 'train')


@pytest.mark.parametrize('override, fragments', [
    ('--config.train.num_steps=abc', ("'abc'", 'takes a value of type int')),
    ('--config.train.num_steps=0', ("'train.num_steps' must be at least 1, got 0",)),
    ('--config.data.batch_size=-4', ("'data.batch_size' must be at least 1",)),
    ('--config.model.num_heads=3', ('model.d_model (256) must be divisible by',)),
    ('--config.task=difusion', ("'task' is 'difusion'", 'diffusion')),
    ('--config.mesh.shape=(7,1,1)', ('mesh.shape (7, 1, 1)', 'devices')),
    ('--config.mesh.shape=(1,1)', ('mesh.shape must have 3 entries',)),
])
def test_invalid_override_value(override, fragments, tmp_path):
  result = run_cli('--config', 'configs/bible_char.py', '--workdir', str(tmp_path / 'w'),
                   override)

  error_line(result, *fragments)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_wrong_type_in_file(tmp_path):
  path = write_config(tmp_path, "  config.train.num_steps = '10'\n")

  result = run_cli('--config', path, '--workdir', str(tmp_path / 'w'))

  # ml_collections rejects the assignment inside get_config, before validate runs.
  error_line(result, 'TypeError', "'num_steps'", "type <class 'int'>", f'{path} line 6')


def test_missing_config_file(tmp_path):
  result = run_cli('--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path / 'w'))

  error_line(result, 'nope.py', 'not found', 'configs/bible_char.py')


def test_unknown_config_argument():
  result = run_cli('--config', 'configs/bible_char.py:smok', '--workdir', '/tmp/unused')

  error_line(result, "'smok'", '"smoke"')


def test_debug_shows_traceback(config_file, tmp_path):
  result = run_cli('--config', config_file, '--workdir', str(tmp_path / 'w'), '--debug',
                   '--config.train.num_steps=0')

  assert result.returncode != 0
  assert 'Traceback' in result.stderr
  assert 'ConfigError' in result.stderr


# ---- Command line: corpus errors ----


def corpus_file(tmp_path, content: bytes):
  path = tmp_path / 'corpus.txt'
  path.write_bytes(content)
  return str(path)


BAD_CORPORA = [
    (None, ('Data file not found', 'corpus.txt')),
    (b'', ('Data file is empty', 'corpus.txt')),
    (b'text\x00\x01\x02binary', ('looks binary', 'byte offset 4', 'UTF-8')),
    (b'caf\xe9 latin-1 text', ('not valid UTF-8 at byte offset 3', 'iconv')),
    (b'   \n\n  ', ('no text after cleaning',)),
]


@pytest.mark.parametrize('content, fragments', BAD_CORPORA)
def test_bad_corpus_message(content, fragments, tmp_path):
  path = str(tmp_path / 'corpus.txt') if content is None else corpus_file(tmp_path, content)
  config = tiny_config()
  config.data.source = 'files'
  config.data.paths = path

  with pytest.raises(corpus.DataError) as raised:
    corpus.load_documents(config.data)

  for fragment in fragments:
    assert fragment in str(raised.value)


# The command line prints these DataErrors as one line; three cases cover it.
@pytest.mark.parametrize('content, fragments', [BAD_CORPORA[0], BAD_CORPORA[2], BAD_CORPORA[3]])
def test_bad_corpus_file(content, fragments, config_file, tmp_path):
  path = str(tmp_path / 'corpus.txt') if content is None else corpus_file(tmp_path, content)
  workdir = str(tmp_path / 'w')

  result = run_cli('--config', config_file, '--workdir', workdir, '--config.data.source=files',
                   f'--config.data.paths={path}')

  error_line(result, *fragments)
  assert checkpoint_steps(workdir) == []


def test_corpus_shorter_than_batch(config_file, tmp_path):
  path = corpus_file(tmp_path, ('In the beginning God created the heaven and the earth. ' * 11)
                     .encode())
  result = run_cli('--config', config_file, '--workdir', str(tmp_path / 'w'),
                   '--config.data.source=files', f'--config.data.paths={path}',
                   '--config.data.batch_size=32', '--config.data.validation_fraction=0.5')

  error_line(result, 'one global batch needs 32', 'smaller batch_size')


@pytest.mark.slow
def test_rerun_after_data_error_uses_fixed_config(config_file, tmp_path):
  # A run that failed before its first checkpoint must not block the fixed rerun.
  workdir = str(tmp_path / 'w')
  failed = run_cli('--config', config_file, '--workdir', workdir, '--config.data.source=files',
                   f'--config.data.paths={tmp_path / "missing.txt"}')
  error_line(failed, 'Data file not found')

  fixed = run_cli('--config', config_file, '--workdir', workdir)

  assert fixed.returncode == 0, fixed.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2, 4]


# ---- Command line: workdirs, checkpoints and teachers ----


def test_changed_config_keeps_checkpoints(trained_copy, config_file):
  before = listing(trained_copy)

  result = run_cli('--config', config_file, '--workdir', trained_copy,
                   '--config.model.d_model=64', '--config.train.num_steps=8')

  error_line(result, 'model.d_model: 32 -> 64', '--allow_config_change')
  assert listing(trained_copy) == before


def damage_file(path, damage):
  data = bytearray(open(path, 'rb').read())
  if damage == 'flip':
    data[len(data) // 2] ^= 0x01
    open(path, 'wb').write(data)
  elif damage == 'truncate':
    open(path, 'wb').write(data[:len(data) // 2])
  else:
    os.remove(path)


def test_flipped_byte_stops_resume(trained_copy, config_file):
  damage_file(largest_state_file(trained_copy, 4), 'flip')
  before = listing(trained_copy)

  # The same command again: it restores step 4 before anything else.
  result = run_cli('--config', config_file, '--workdir', trained_copy)

  line = error_line(result, 'Checkpoint step 4 is corrupt', 'SHA-256')
  assert os.path.join('checkpoints', '4') in line  # Names the folder to delete.
  assert listing(trained_copy) == before


@pytest.mark.parametrize('damage, fragments', [
    ('flip', ('is corrupt', 'does not match its SHA-256 checksum')),
    ('truncate', ('is truncated or altered', 'bytes, expected')),
    ('delete', ('is incomplete', 'is missing')),
])
@pytest.mark.parametrize('file_kind', ['array', 'metadata'])
def test_restore_verifies_integrity(damage, fragments, file_kind, trained_copy):
  if file_kind == 'array':
    path = largest_state_file(trained_copy, 4)
  else:
    path = os.path.join(workdir_lib.checkpoint_dir(trained_copy), '4', 'data', 'metadata')
  damage_file(path, damage)

  with pytest.raises(checkpointing.CheckpointError) as raised:
    inference.load(trained_copy)

  message = str(raised.value)
  assert 'Checkpoint step 4' in message
  for fragment in fragments:
    assert fragment in message
  assert 'Delete the folder' in message
  # The step before is intact and still loads.
  assert inference.load(trained_copy, step=2).step == 2


def test_restore_without_checksums_still_loads(trained_copy):
  # A step killed between Orbax's rename and the checksum write has no checksum file.
  os.remove(os.path.join(workdir_lib.checkpoint_dir(trained_copy), '4',
                         checkpointing.CHECKSUM_FILE))

  loaded = inference.load(trained_copy)

  assert loaded.step == 4


def test_student_rejected_as_teacher(trained_copy, tmp_path):
  # A student workdir differs from a teacher's in the task of its config and
  # checkpoint metadata; rewriting those two fields saves training a student.
  meta_path = os.path.join(workdir_lib.checkpoint_dir(trained_copy), '4', 'meta', 'metadata')
  for path in (meta_path, workdir_lib.config_path(trained_copy)):
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    record['task'] = 'distill'
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(record, f)

  result = run_cli('--config', 'configs/mcd_bible_char.py:smoke', '--workdir',
                   str(tmp_path / 'second'), f'--config.distill.teacher_workdir={trained_copy}')

  error_line(result, trained_copy, "'distill' model", 'task "diffusion"')


def test_teacher_without_checkpoint(tmp_path):
  result = run_cli('--config', 'configs/mcd_bible_char.py:smoke', '--workdir',
                   str(tmp_path / 'student'),
                   f'--config.distill.teacher_workdir={tmp_path / "empty"}')

  error_line(result, 'config.json not found', 'finished training run')


def test_tokenizer_mismatch_on_sample(trained_copy, config_file):
  path = os.path.join(workdir_lib.tokenizer_dir(trained_copy), 'tokenizer.json')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  saved['data']['characters'] = saved['data']['characters'].replace('Z', '')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(saved, f)

  result = run_cli('--config', config_file, '--workdir', trained_copy, '--mode', 'sample')

  error_line(result, 'does not match', 'tokenizer')


@pytest.mark.parametrize('prompt, fragments', [
    ('In the beginning #@', ("'#', '@'", 'outside the', 'Remove or replace')),
    ('In the beginning God created', ('28 tokens', 'data.seq_len', 'at most 15 tokens')),
])
def test_invalid_prompt(prompt, fragments, trained, config_file):
  result = run_cli('--config', config_file, '--workdir', trained, '--mode', 'sample',
                   f'--config.sampling.prompt={prompt}')

  error_line(result, 'sampling.prompt', *fragments)


# ---- Divergence ----


def test_divergence_keeps_last_good_checkpoint(trained_copy, config_file):
  before = listing(trained_copy)

  result = run_cli('--config', config_file, '--workdir', trained_copy, '--allow_config_change',
                   '--config.train.num_steps=12', '--config.optim.learning_rate=1e30')

  error_line(result, 'Training diverged', 'between steps 4 and 6',
             'the last good checkpoint is step 4', 'optim.learning_rate')
  assert listing(trained_copy) == before


def test_nan_loss_stops_before_saving(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'nan')
  config = tiny_config()
  config.train.num_steps = 8
  config.train.log_every = 4
  config.train.checkpoint_every = 2
  real_make_train_step = train.make_train_step

  def make_train_step_with_nan_loss(*args, **kwargs):
    train_step = real_make_train_step(*args, **kwargs)

    def step_then_poison(state, *step_args):
      state, step_metrics = train_step(state, *step_args)
      if int(state.step) == 3:  # Step 3 reports a NaN loss, as a diverged step would.
        step_metrics = dict(step_metrics, loss=jax.numpy.float32(float('nan')))
      return state, step_metrics

    return step_then_poison

  monkeypatch.setattr(train, 'make_train_step', make_train_step_with_nan_loss)

  with pytest.raises(train.TrainingDivergedError) as raised:
    train.train_and_evaluate(config, workdir)

  message = str(raised.value)
  assert 'between steps 2 and 4' in message
  assert 'the last good checkpoint is step 2' in message
  assert checkpoint_steps(workdir) == [2]


# ---- Crashes: SIGKILL and SIGTERM during training ----


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """Parameters after the 16 'crash' steps, trained without interruption."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'run')
  train.train_and_evaluate(tiny_config('crash'), workdir)
  return final_params(workdir)


def start_training(config_file, workdir):
  return subprocess.Popen(
      cli_command('--config', f'{config_file}:crash', '--workdir', workdir), cwd=REPO,
      env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process, workdir, step, timeout=120):
  """Waits until checkpoint `step` exists; returns False when the run ended first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(saved >= step for saved in checkpoint_steps(workdir)):
      return True
    if process.poll() is not None:
      return False
    time.sleep(0.01)
  raise AssertionError(f'no checkpoint {step} in {workdir} after {timeout} s')


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(uninterrupted, config_file, tmp_path):
  workdir = str(tmp_path / 'killed')
  # Fixed points: after checkpoint k appears, wait `delay` seconds, then kill,
  # so kills land inside steps, inside saves and between them.
  points = random.Random(0)
  kills = []
  for _ in range(3):
    step, delay = points.randint(1, 14), points.uniform(0.0, 0.05)
    process = start_training(config_file, workdir)
    if wait_for_checkpoint(process, workdir, step):
      time.sleep(delay)
      process.kill()  # SIGKILL: no handler runs.
    process.communicate(timeout=60)
    kills.append((step, process.returncode, checkpoint_steps(workdir)))

  assert any(code == -signal.SIGKILL for _, code, _ in kills), kills
  final = start_training(config_file, workdir)
  _, stderr = final.communicate(timeout=180)

  assert final.returncode == 0, stderr[-3000:]
  assert checkpoint_steps(workdir)[-1] == 16
  assert_same_params(uninterrupted, final_params(workdir))


@pytest.mark.slow
def test_sigterm_saves_and_resumes(uninterrupted, config_file, tmp_path):
  workdir = str(tmp_path / 'stopped')
  process = start_training(config_file, workdir)
  assert wait_for_checkpoint(process, workdir, 5)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)

  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'Traceback' not in stderr
  stopped = [line for line in stderr.splitlines() if line.startswith('stopped by SIGTERM')]
  assert len(stopped) == 1, stderr[-3000:]
  stop_step = int(stopped[0].split('at step ')[1].split()[0])
  assert 5 <= stop_step < 16
  assert checkpoint_steps(workdir)[-1] == stop_step

  resumed = start_training(config_file, workdir)
  _, stderr = resumed.communicate(timeout=180)

  assert resumed.returncode == 0, stderr[-3000:]
  assert f'Resuming diffusion at step {stop_step}' in stderr
  assert_same_params(uninterrupted, final_params(workdir))
