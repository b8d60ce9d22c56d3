"""The main job (`--mode pipeline`) end to end on tiny models, then rerun."""

import json
import math
import os
import types

import ml_collections
import pytest

from mcd_jax import config_base
from mcd_jax import pipeline
from mcd_jax import quality
from test_train import read_metrics
from test_train import tiny_config
from test_train import tiny_distill_config

CONFIG_FILE = '''import json

import ml_collections


def get_config(arg=None):
  with open({path!r}, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
'''


def write_config_file(directory, name: str, config: ml_collections.ConfigDict) -> str:
  """Writes `config` as a config file that the pipeline loads by path."""
  json_path = os.path.join(directory, name + '.json')
  with open(json_path, 'w', encoding='utf-8') as f:
    f.write(config.to_json())
  path = os.path.join(directory, name + '.py')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(CONFIG_FILE.format(path=json_path))
  return path


def pipeline_config(tmp_path) -> ml_collections.ConfigDict:
  config = tiny_distill_config('', base_steps=4, num_rounds=1, steps_per_round=2)
  config.pipeline.teacher_config = write_config_file(tmp_path, 'teacher',
                                                     tiny_config(num_steps=4))
  config.pipeline.evaluator_config = write_config_file(
      tmp_path, 'evaluator', tiny_config(task='autoregressive', num_steps=4))
  config.pipeline.students = ('mcd_data', 'sdtt')
  config.pipeline.step_divisors = (2,)
  config.pipeline.num_samples = 4
  config.pipeline.search_samples = 4
  config.pipeline.batch_size = 4
  return config


@pytest.fixture(scope='module')
def job(tmp_path_factory):
  """Runs the tiny pipeline once: (config directory, workdir, table rows)."""
  directory = tmp_path_factory.mktemp('pipeline')
  workdir = str(directory / 'job')
  rows = pipeline.run_pipeline(pipeline_config(directory), workdir)
  return directory, workdir, rows


@pytest.mark.slow
def test_pipeline_trains_then_reuses_stages(job):
  directory, workdir, rows = job

  # Teacher at N₀ = 4, then at N₀ / 2 = 2 steps: the teacher, both students and
  # the temperature-matched control.
  assert [(row['model'], row['steps']) for row in rows] == [
      ('teacher', 4), ('teacher', 2), ('mcd_data', 2), ('sdtt', 2),
      ('teacher (temperature-matched)', 2)]
  for row in rows:
    assert 1 <= row['nfe'] <= row['steps']
    assert math.isfinite(row['gen_ppl'])
    assert row['gen_ppl'] > 1
    assert row['gen_ppl_low'] <= row['gen_ppl'] <= row['gen_ppl_high']
  results = os.path.join(workdir, 'results')
  with open(os.path.join(results, 'table.json'), encoding='utf-8') as f:
    table = json.load(f)
  assert table['base_steps'] == 4
  assert len(table['rows']) == len(rows)
  assert math.isfinite(table['evaluator']['ar_bits_per_token'])
  assert os.path.getsize(os.path.join(results, 'gen_ppl_vs_nfe.png')) > 0
  with open(os.path.join(results, 'table.md'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) == 2 + len(rows)

  # A rerun trains nothing again and draws the same samples.
  stages = ('teacher', 'evaluator', 'students/mcd_data', 'students/sdtt')
  lengths = {stage: len(read_metrics(os.path.join(workdir, stage))) for stage in stages}
  again = pipeline.run_pipeline(pipeline_config(directory), workdir)
  assert {stage: len(read_metrics(os.path.join(workdir, stage))) for stage in stages} == lengths
  assert [row['gen_ppl'] for row in again] == [row['gen_ppl'] for row in rows]


def test_pipeline_rejects_bad_settings_early(tmp_path):
  config = pipeline_config(tmp_path)
  config.pipeline.evaluator_config = str(tmp_path / 'missing.py')
  with pytest.raises(config_base.ConfigError, match='missing.py'):
    pipeline.run_pipeline(config, str(tmp_path / 'job'))

  config = pipeline_config(tmp_path)
  config.pipeline.students = ('mcd_data', 'nonsense')
  with pytest.raises(config_base.ConfigError, match='nonsense'):
    pipeline.run_pipeline(config, str(tmp_path / 'job'))

  assert not os.path.exists(tmp_path / 'job' / 'teacher')


@pytest.mark.slow
def test_evaluate_models_table(job, tmp_path):
  _, workdir, pipeline_rows = job
  config = pipeline_config(tmp_path)
  config.pipeline.evaluator_workdir = os.path.join(workdir, 'evaluator')
  config.evaluate.models = (f'teacher={workdir}/teacher',
                            f'mcd={workdir}/students/mcd_data')
  config.evaluate.samplers = ('ancestral', 'deterministic')
  config.evaluate.steps = (2,)
  config.evaluate.control = 'teacher=mcd'
  config_base.validate(config)

  rows = quality.evaluate_models(config, str(tmp_path / 'table'))

  assert [(row['model'], row['sampler']) for row in rows] == [
      ('teacher', 'ancestral'), ('mcd', 'ancestral'),
      ('teacher (temperature-matched)', 'ancestral'),
      ('teacher', 'deterministic'), ('mcd', 'deterministic'),
      ('teacher (temperature-matched)', 'deterministic')]
  for row in rows:
    assert row['steps'] == 2
    assert 1 <= row['nfe'] <= 2
  control = rows[2]
  assert control['reference'] == 'mcd'
  # search_samples = num_samples here, so the search used exactly the reference row's samples.
  assert control['search_samples'] == 4
  assert control['target_entropy'] == pytest.approx(rows[1]['entropy'], rel=1e-6)
  assert isinstance(control['matched'], bool)
  # The same key and sample counts as the pipeline: the same samples.
  pipeline_teacher = [row for row in pipeline_rows
                      if row['model'] == 'teacher' and row['steps'] == 2]
  assert rows[0]['gen_ppl'] == pipeline_teacher[0]['gen_ppl']
  with open(tmp_path / 'table' / 'results' / 'table.md', encoding='utf-8') as f:
    assert len(f.read().splitlines()) == 2 + len(rows)
  with open(tmp_path / 'table' / 'results' / 'table.json', encoding='utf-8') as f:
    summary = json.load(f)
  assert summary['models']['mcd']['workdir'] == os.path.join(workdir, 'students', 'mcd_data')
  assert summary['models']['mcd']['step'] == 2
  assert summary['evaluate']['steps'] == [2]


@pytest.mark.parametrize('field, value, message', [
    ('models', ('teacher',), 'NAME=WORKDIR'),
    ('models', ('a=x', 'a=y'), 'twice'),
    ('control', 'teacher=missing', 'two names'),
    ('samplers', ('greedy',), 'greedy'),
    ('steps', (), 'evaluate.steps is empty'),
])
def test_evaluate_models_rejects_bad_input(tmp_path, field, value, message):
  config = pipeline_config(tmp_path)
  config.pipeline.evaluator_workdir = str(tmp_path / 'evaluator')
  config.evaluate.models = ('teacher=x', 'mcd=y')
  config.evaluate[field] = value

  with pytest.raises(config_base.ConfigError, match=message):
    quality.evaluate_models(config, str(tmp_path / 'table'))


@pytest.mark.slow
@pytest.mark.parametrize('evaluator, model, message', [
    ('teacher', 'students/mcd_data', "'diffusion' model, but it must be 'autoregressive'"),
    ('evaluator', 'evaluator', "'autoregressive' model, but it must be 'diffusion'"),
])
def test_evaluate_models_rejects_swapped_paths(job, tmp_path, evaluator, model, message):
  _, workdir, _ = job
  config = pipeline_config(tmp_path)
  config.pipeline.evaluator_workdir = os.path.join(workdir, evaluator)
  config.evaluate.models = (f'model={workdir}/{model}',)

  with pytest.raises(config_base.ConfigError, match=message):
    quality.evaluate_models(config, str(tmp_path / 'table'))


@pytest.mark.slow
@pytest.mark.parametrize('field, value, message', [
    ('pipeline.step_divisors', (0,), 'step_divisors contains 0'),
    ('pipeline.step_divisors', (3,), 'divide distill.base_steps'),
    ('distill.teacher_workdir', 'evaluator', "'autoregressive' model"),
])
def test_pipeline_rejects_bad_workdirs_early(job, tmp_path, field, value, message):
  _, workdir, _ = job
  config = pipeline_config(tmp_path)
  if field == 'distill.teacher_workdir':
    value = os.path.join(workdir, value)
  section, key = field.split('.')
  config[section][key] = value

  with pytest.raises(config_base.ConfigError, match=message):
    pipeline.run_pipeline(config, str(tmp_path / 'job'))
  assert not os.path.exists(tmp_path / 'job')


def loaded_stub(fingerprint: str, seq_len: int):
  """Returns an object with the fields that `check_compatible` reads."""
  tokenizer = types.SimpleNamespace(fingerprint=lambda: fingerprint)
  config = ml_collections.ConfigDict({'data': {'seq_len': seq_len}})
  return types.SimpleNamespace(tokenizer=tokenizer, vocab_size=65, config=config)


@pytest.mark.parametrize('model, message', [
    (loaded_stub('other', 16), 'different tokenizers'),
    (loaded_stub('same', 32), 'sequences of 32 tokens'),
])
def test_check_compatible_rejects_mismatch(model, message):
  evaluator = loaded_stub('same', 16)
  quality.check_compatible(evaluator, {'good': loaded_stub('same', 16)})

  with pytest.raises(config_base.ConfigError, match=message):
    quality.check_compatible(evaluator, {'bad': model})


def test_evaluate_rejects_settings_without_models(tmp_path):
  config = pipeline_config(tmp_path)
  config.evaluate.control = 'teacher=mcd'

  with pytest.raises(config_base.ConfigError, match='evaluate.control is used only with'):
    quality.evaluate(config, str(tmp_path / 'run'))
