"""End-to-end tests of the trainer on tiny configs: loss falls, resume, checkpoints."""

import importlib.util
import json
import math
import os
import signal

import jax
import ml_collections
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
CONFIGS = ('bible_char', 'bible_char_ar', 'gutenberg_char', 'gutenberg_char_ar',
           'owt_gpt2_small')


def load_config(name: str, arg: str | None = 'smoke') -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(task='diffusion', num_steps=12) -> ml_collections.ConfigDict:
  config = load_config('bible_char')
  config.task = task
  config.data.max_chars = 60_000
  config.data.seq_len = 16
  config.data.batch_size = 4
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.train.num_steps = num_steps
  config.train.log_every = 4
  config.train.eval_every = 1000
  config.train.checkpoint_every = 4
  config.sampling.num_steps = 4
  config.sampling.num_samples = 2
  config.sampling.batch_size = 2
  return config


def tiny_distill_config(teacher_workdir: str, base_steps: int, num_rounds: int,
                        steps_per_round: int) -> ml_collections.ConfigDict:
  """The demo distillation config, cut to a few steps over a tiny teacher."""
  config = load_config('mcd_bible_char')
  config.distill.teacher_workdir = teacher_workdir
  config.distill.base_steps = base_steps
  config.distill.num_rounds = num_rounds
  config.distill.steps_per_round = steps_per_round
  config.train.num_steps = num_rounds * steps_per_round
  config.data.batch_size = 4
  config.sampling.num_samples = 2
  config.sampling.batch_size = 2
  return config


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def final_params(workdir: str):
  loaded = inference.load(workdir, use_ema=False)
  return jax.device_get(loaded.params)


@pytest.mark.slow
@pytest.mark.parametrize('name', CONFIGS)
def test_smoke_config_loss_falls(name, tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv('MCD_DATA_DIR', data_dir)
  config = load_config(name)
  config.train.num_steps = 60
  config.train.log_every = 10
  config.train.checkpoint_every = 60
  config.optim.learning_rate = 3e-3
  config.sampling.num_samples = 2
  config.sampling.batch_size = 2
  workdir = str(tmp_path / name)

  summary = train.train_and_evaluate(config, workdir)

  losses = [record['loss'] for record in read_metrics(workdir) if 'loss' in record]
  assert len(losses) == 6
  assert losses[-1] < losses[0]
  assert math.isfinite(summary[[key for key in summary if key.startswith('val_')][0]])


def test_resume_matches_uninterrupted_run(tmp_path):
  straight = str(tmp_path / 'straight')
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(tiny_config(num_steps=12), straight)

  # Preempted during step 8, then the same command again.
  summary = run_until_sigterm(tiny_config(num_steps=12), resumed, stop_after=8)
  assert summary == {'step': 8, 'stopped_by': 'SIGTERM'}
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(resumed), keep=10)
  assert manager.latest_step() == 8
  train.train_and_evaluate(tiny_config(num_steps=12), resumed)

  expected = jax.tree_util.tree_leaves(final_params(straight))
  actual = jax.tree_util.tree_leaves(final_params(resumed))
  assert len(expected) == len(actual)
  for left, right in zip(expected, actual):
    np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-7)


def test_resume_replays_no_batch(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_steps=8)
  train.train_and_evaluate(config, workdir)

  run = experiment.setup(config, workdir)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), keep=10)
  data_state = manager.restore(8, args=checkpointing.ocp.args.Composite(
      data=checkpointing.ocp.args.JsonRestore()))['data']

  reference = experiment.setup(config, str(tmp_path / 'fresh')).datasets.train_iterator
  for _ in range(8):
    next(reference)
  run.datasets.train_iterator.set_state(data_state)
  np.testing.assert_array_equal(next(run.datasets.train_iterator), next(reference))


def test_checkpoint_round_trip(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(num_steps=4), workdir)

  first = jax.device_get(inference.load(workdir).params)
  second = jax.device_get(inference.load(workdir).params)
  for left, right in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
    np.testing.assert_array_equal(left, right)
  loaded = inference.load(workdir)
  assert loaded.step == 4
  assert loaded.vocab_size == loaded.tokenizer.vocab_size


def test_changed_config_rejects_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(num_steps=4), workdir)
  changed = tiny_config(num_steps=8)
  changed.model.d_model = 64

  with pytest.raises(workdir_lib.WorkdirError, match='model.d_model: 32 -> 64'):
    train.train_and_evaluate(changed, workdir)


@pytest.mark.parametrize('method, trajectory_source',
                         [('mcd', 'data'), ('mcd', 'teacher'), ('sdtt', 'data')])
def test_distill_resumes_mid_round(tmp_path, method, trajectory_source):
  teacher = str(tmp_path / 'teacher')
  train.train_and_evaluate(tiny_config(num_steps=4), teacher)

  def student_config(num_steps_per_round):
    config = tiny_distill_config(teacher, base_steps=8, num_rounds=2,
                                 steps_per_round=num_steps_per_round)
    config.distill.method = method
    config.distill.trajectory_source = trajectory_source
    config.train.checkpoint_every = 3
    config.train.log_every = 3
    return config

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(student_config(6), straight)

  # Step 9 lies inside round 1, whose teacher is the student of step 6: the
  # resumed run must restore that teacher, not take the current student.
  summary = run_until_sigterm(student_config(6), resumed, stop_after=9)
  assert summary == {'step': 9, 'stopped_by': 'SIGTERM'}
  train.train_and_evaluate(student_config(6), resumed)

  expected = jax.tree_util.tree_leaves(final_params(straight))
  actual = jax.tree_util.tree_leaves(final_params(resumed))
  for left, right in zip(expected, actual):
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)


def run_until_sigterm(config, workdir, stop_after: int):
  """Runs the trainer and sends SIGTERM to this process during step `stop_after`."""
  real_setup = experiment.setup

  def setup(*args, **kwargs):
    run = real_setup(*args, **kwargs)
    iterator = run.datasets.train_iterator
    real_next = iterator.__next__
    calls = {'count': 0}

    def next_then_signal():
      calls['count'] += 1
      if calls['count'] == stop_after:
        os.kill(os.getpid(), signal.SIGTERM)
      return real_next()

    iterator.__next__ = next_then_signal
    run.datasets.train_iterator = _CallNext(iterator)
    return run

  experiment.setup = setup
  try:
    return train.train_and_evaluate(config, workdir)
  finally:
    experiment.setup = real_setup


class _CallNext:
  """Routes next() to an instance attribute (next() looks methods up on the type)."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __next__(self):
    return self._iterator.__next__()

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    return self._iterator.set_state(state)


def test_markov_teacher_elbo_above_entropy_rate(tmp_path):
  config = tiny_config(num_steps=150)
  config.data.source = 'markov'
  config.data.markov_num_symbols = 4
  config.data.markov_num_chars = 40_000
  config.data.max_chars = 0
  config.data.seq_len = 32
  config.data.batch_size = 16
  config.train.eval_batches = 16
  config.train.checkpoint_every = 150
  config.optim.learning_rate = 3e-3
  workdir = str(tmp_path / 'markov')

  summary = train.train_and_evaluate(config, workdir)

  source = corpus.markov_source(4, config.data.seed)
  elbo_bits = summary['val_elbo_bits_per_token']
  # The ELBO bounds the NLL, which cannot beat the entropy rate in expectation.
  # The estimate averages 16 x 16 x 32 = 8192 tokens; its per-token standard
  # deviation is below 8 bits (ELBO weights at small t), so 4 standard errors
  # are at most 4 * 8 / sqrt(8192) = 0.35 bits.
  assert elbo_bits > source.entropy_rate_bits - 0.35
  # And the teacher learned something: it beats the uniform 2 bits per symbol.
  assert elbo_bits < math.log2(4) + 0.5


def test_new_config_key_keeps_resume(tmp_path):
  # A workdir written before a key existed resumes when the key has its default.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(num_steps=4), workdir)
  path = workdir_lib.config_path(workdir)
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  del saved['model']['absolute_positions']
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(saved, f)
  meta_path = os.path.join(workdir_lib.checkpoint_dir(workdir), '4', 'meta', 'metadata')
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  del meta['model']['absolute_positions']
  with open(meta_path, 'w', encoding='utf-8') as f:
    json.dump(meta, f)
  os.remove(os.path.join(workdir_lib.checkpoint_dir(workdir), '4', 'mcd_checksums.json'))

  summary = train.train_and_evaluate(tiny_config(num_steps=4), workdir)

  assert summary['step'] == 4
