"""Every file in configs/: both variants validate, and the docstring shows its command."""

import glob
import os

import pytest

from mcd_jax import config_base
from mcd_jax import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(path)[:-3]
               for path in glob.glob(os.path.join(REPO, 'configs', '*.py')))
DISTILL = [name for name in NAMES if pipeline.load_config_file(
    f'configs/{name}.py').task == 'distill']


def test_configs_found():
  assert {'bible_char', 'gutenberg_char', 'mcd_bible_char', 'mcd_gutenberg_char',
          'owt_gpt2_small'} <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('arg', ['', ':smoke'])
def test_config_validates(name, arg):
  config = pipeline.load_config_file(f'configs/{name}.py{arg}')

  config_base.validate(config)


@pytest.mark.parametrize('name', NAMES)
def test_docstring_shows_command(name):
  with open(os.path.join(REPO, 'configs', name + '.py'), encoding='utf-8') as f:
    source = f.read()
  docstring = source.split('"""')[1]

  assert 'python -m mcd_jax.main' in docstring
  assert f'--config configs/{name}.py' in docstring


@pytest.mark.parametrize('name', DISTILL)
@pytest.mark.parametrize('arg', ['', ':smoke'])
def test_distill_config_matches_teacher(name, arg):
  config = pipeline.load_config_file(f'configs/{name}.py{arg}')
  teacher = pipeline.load_config_file(config.pipeline.teacher_config)
  evaluator = pipeline.load_config_file(config.pipeline.evaluator_config)

  assert config.pipeline.teacher_config.endswith(arg or '.py')
  assert teacher.task == 'diffusion'
  assert evaluator.task == 'autoregressive'
  assert config.distill.base_steps % max(config.pipeline.step_divisors) == 0
  # Gen PPL is meaningful only when the evaluator reads the teacher's tokens.
  for key in ('source', 'paths', 'tokenizer', 'seq_len', 'validation_fraction'):
    assert evaluator.data[key] == teacher.data[key], key


@pytest.mark.parametrize('value, valid', [(1.0, True), (0.5, True), (1.5, False), (0.0, False)])
def test_temperature_low_range(value, valid):
  config = config_base.base_config()
  config.pipeline.temperature_low = value

  if valid:
    config_base.validate(config)
  else:
    with pytest.raises(config_base.ConfigError, match='must be > 0 and <= 1'):
      config_base.validate(config)
