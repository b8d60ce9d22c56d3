"""The main MCD job: teacher, students, evaluator, then the quality-speed table.

  python -m mcd_jax.main --config configs/mcd_bible_char.py --workdir DIR --mode pipeline

  DIR/teacher/              masked diffusion teacher (unless distill.teacher_workdir is set)
  DIR/students/NAME/        one distilled student per entry of pipeline.students
  DIR/evaluator/            autoregressive evaluator (unless pipeline.evaluator_workdir is set)
  DIR/results/table.json    every (model, steps, temperature) row
  DIR/results/table.md      the same as a Markdown table
  DIR/results/gen_ppl_vs_nfe.png

Every stage resumes from its own workdir, so rerunning the command after a
crash continues where it stopped.
"""

import importlib.util
import os

from absl import logging
import ml_collections

from mcd_jax import checkpointing
from mcd_jax import config_base
from mcd_jax import inference
from mcd_jax import metrics as metrics_lib
from mcd_jax import quality
from mcd_jax import train
from mcd_jax import workdir as workdir_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Student name -> (distill.method, distill.trajectory_source, distill.divergence).
STUDENTS = {
    'mcd_data': ('mcd', 'data', 'reverse_kl'),
    'mcd_teacher': ('mcd', 'teacher', 'reverse_kl'),
    'mcd_forward_kl': ('mcd', 'data', 'forward_kl'),
    'sdtt': ('sdtt', 'data', 'reverse_kl'),
}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` (relative to the working directory or the repository)."""
  path, _, arg = spec.partition(':')
  candidates = [path, os.path.join(_REPO, path)]
  found = next((candidate for candidate in candidates if os.path.isfile(candidate)), None)
  if found is None:
    raise config_base.ConfigError(f'Config file {path!r} not found (from {spec!r}).')
  module_spec = importlib.util.spec_from_file_location('mcd_jax_loaded_config', found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _is_finished(workdir: str, num_steps: int) -> bool:
  directory = workdir_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return False
  manager = checkpointing.make_manager(directory, keep=1000)
  return manager.latest_step() is not None and manager.latest_step() >= num_steps


class StageStopped(Exception):
  """A stage stopped by a signal; `result` contains the signal name and the step."""

  def __init__(self, result: dict):
    super().__init__(f'stopped by {result["stopped_by"]} at step {result["step"]}')
    self.result = result


def _train_stage(name: str, config, workdir: str) -> str:
  if _is_finished(workdir, config.train.num_steps):
    logging.info('Stage %s: already trained in %s.', name, workdir)
    return workdir
  logging.info('Stage %s: training in %s.', name, workdir)
  result = train.train_and_evaluate(config, workdir)
  if result.get('stopped_by'):
    raise StageStopped(result)
  return workdir


def student_config(config, name: str, teacher_dir: str) -> ml_collections.ConfigDict:
  if name not in STUDENTS:
    raise config_base.ConfigError(
        f'Unknown student {name!r} in pipeline.students; choose from {sorted(STUDENTS)}.')
  student = ml_collections.ConfigDict(config.to_dict())
  student.distill.method, student.distill.trajectory_source, student.distill.divergence = (
      STUDENTS[name])
  student.distill.teacher_workdir = teacher_dir
  return student


def evaluate_table(config, workdir: str, teacher_dir: str, evaluator_dir: str,
                   student_dirs: dict[str, str]) -> list[dict]:
  """Measures teacher, students and controls; writes table.json, table.md and a plot."""
  evaluator = inference.load(evaluator_dir)
  teacher = inference.load(teacher_dir)
  students = {name: inference.load(path) for name, path in student_dirs.items()}
  quality.check_compatible(evaluator, {'teacher': teacher, **students})
  measurer = quality.Measurer(config, evaluator)
  base_steps = config.distill.base_steps
  rows = []
  planned = 1 + len(config.pipeline.step_divisors) * (len(students) + 2)
  progress = metrics_lib.Progress(planned, 0, 'evaluation', log_every=1)

  def add(row):
    rows.append(row)
    progress.update(len(rows), {'gen_ppl': row['gen_ppl'], 'nfe': row['nfe']})

  add(measurer.row('teacher', teacher, base_steps))
  for divisor in config.pipeline.step_divisors:
    steps = base_steps // divisor
    add(measurer.row('teacher', teacher, steps))
    student_rows = [measurer.row(name, loaded, steps) for name, loaded in students.items()]
    for row in student_rows:
      add(row)

    if student_rows:
      # The control: the undistilled teacher at the student's step count, its
      # temperature tuned so its entropy matches the first student's.
      reference = student_rows[0]['model']
      add(measurer.matched_row('teacher', teacher, steps, reference, students[reference]))
  progress.close()

  evaluator_bits = inference.evaluate_workdir(evaluator.config, evaluator_dir)
  paths = {'teacher': (teacher_dir, teacher)}
  paths.update({name: (student_dirs[name], loaded) for name, loaded in students.items()})
  summary = {'models': quality.describe(paths), 'evaluator': evaluator_bits,
             'base_steps': base_steps, 'pipeline': config.pipeline.to_dict(),
             'seed': config.seed}
  quality.write_results(os.path.join(workdir, 'results'), rows, summary,
                        f'Gen PPL against NFE (teacher N0 = {base_steps})')
  return rows


def run_pipeline(config, workdir: str) -> list[dict] | dict:
  """Trains what is missing, then measures the quality-speed table.

  Returns the table's rows, or the stopped stage's result (with 'stopped_by')
  when a signal stopped training, so the command line exits as after `train`.
  """
  try:
    return _run_pipeline(config, workdir)
  except StageStopped as stopped:
    return stopped.result


def _run_pipeline(config, workdir: str) -> list[dict]:
  config_base.validate(config)
  if config.task != 'distill':
    raise config_base.ConfigError(
        f'--mode pipeline needs a distillation config (task "distill"), got task '
        f'{config.task!r}; try configs/mcd_bible_char.py.')
  if not (config.distill.teacher_workdir or config.pipeline.teacher_config):
    raise config_base.ConfigError(
        'Set distill.teacher_workdir to a trained teacher, or pipeline.teacher_config '
        'to a config to train one.')
  if not (config.pipeline.evaluator_workdir or config.pipeline.evaluator_config):
    raise config_base.ConfigError(
        'Set pipeline.evaluator_workdir to a trained autoregressive model, or '
        'pipeline.evaluator_config to a config to train one.')
  for name in config.pipeline.students:
    student_config(config, name, '')  # Rejects unknown names before any training.
  for divisor in config.pipeline.step_divisors:
    if divisor < 1 or config.distill.base_steps % divisor:
      raise config_base.ConfigError(
          f'pipeline.step_divisors contains {divisor}; each must be at least 1 and divide '
          f'distill.base_steps ({config.distill.base_steps}).')
  if config.distill.teacher_workdir:
    quality.check_workdir_task(config.distill.teacher_workdir, 'distill.teacher_workdir',
                               ('diffusion',))
  if config.pipeline.evaluator_workdir:
    quality.check_workdir_task(config.pipeline.evaluator_workdir,
                               'pipeline.evaluator_workdir', ('autoregressive',))
  if config.evaluate.models or quality.ignored_evaluate_keys(config):
    logging.warning('--mode pipeline ignores the evaluate.* settings; it measures the '
                    'steps of distill.base_steps and pipeline.step_divisors.')
  # Load the config files now, so a wrong path fails before any training.
  teacher_config = (None if config.distill.teacher_workdir
                    else load_config_file(config.pipeline.teacher_config))
  evaluator_config = (None if config.pipeline.evaluator_workdir
                      else load_config_file(config.pipeline.evaluator_config))

  teacher_dir = config.distill.teacher_workdir or _train_stage(
      'teacher', teacher_config, os.path.join(workdir, 'teacher'))

  student_dirs = {}
  for name in config.pipeline.students:
    student_dirs[name] = _train_stage(
        name, student_config(config, name, teacher_dir),
        os.path.join(workdir, 'students', name))

  # The evaluator is needed only for the table, so the students train first.
  evaluator_dir = config.pipeline.evaluator_workdir or _train_stage(
      'evaluator', evaluator_config, os.path.join(workdir, 'evaluator'))

  return evaluate_table(config, workdir, teacher_dir, evaluator_dir, student_dirs)
