r"""Command line of mcd_jax.

  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible
  python -m mcd_jax.main --config configs/bible_char.py:smoke --workdir /tmp/smoke
  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible --mode sample

Modes:
  train     train config.task (diffusion, autoregressive or distill) in --workdir,
            resuming from its latest checkpoint; then evaluate and write samples.
  evaluate  validation ELBO (or AR perplexity) of the checkpoint in --workdir;
            with config.evaluate.models set, the quality-speed table of those
            models instead, written to --workdir/results.
  sample    write samples of the checkpoint in --workdir with config.sampling.
  pipeline  the main MCD job: teacher (unless distill.teacher_workdir is set),
            MCD and SDTT students, AR evaluator, then the quality-speed table.

Override any config key: --config.train.num_steps=200 --config.model.dtype=bfloat16.

Exit status:
  0         the mode finished.
  1         invalid input. One `error:` line on stderr names the value and the
            fix; --debug shows the traceback instead.
  143, 130  SIGTERM or SIGINT stopped training after it saved a checkpoint
            (128 + the signal number). Rerun the same command to resume.
docs/reliability.md lists the messages.
"""

import ast
import glob
import logging as python_logging
import os
import re
import signal
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')
_MODES = ('train', 'evaluate', 'sample', 'pipeline')


def shipped_configs() -> list[str]:
  return sorted(os.path.basename(path)
                for path in glob.glob(os.path.join(_REPO_CONFIGS, '*.py'))
                if not os.path.basename(path).startswith('_'))


config_flags.DEFINE_config_file(
    'config', None,
    'Config file, optionally with ":smoke" for the one-minute variant. Shipped configs '
    f'(in configs/): {", ".join(shipped_configs())}.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', _MODES, 'What to run (see the module help).')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir even if its config differs in trained keys.')
flags.DEFINE_bool('debug', False, 'Show full tracebacks instead of one-line errors.')
flags.DEFINE_enum('platform', None, ['cpu', 'gpu', 'tpu'],
                  'Stop unless JAX runs on this platform (launch scripts set it, so a '
                  'job never falls back to the CPU quietly).')
flags.DEFINE_integer('min_devices', 0, 'Stop unless at least this many devices exist.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for jax.distributed (multi-host runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes for jax.distributed.')
flags.DEFINE_integer('process_id', None, 'This process index for jax.distributed.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'Initialise jax.distributed: "auto" does so under SLURM with several '
                  'tasks, on multi-host TPU VMs, or when --coordinator_address is set.')


class LaunchError(RuntimeError):
  """The devices found do not match what the launch asked for."""


def _wants_distributed() -> bool:
  if FLAGS.distributed == 'on' or FLAGS.coordinator_address:
    return True
  if FLAGS.distributed == 'off':
    return False
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts


def initialize_runtime() -> None:
  """Starts jax.distributed first, then checks platform and device count."""
  import jax  # pylint: disable=import-outside-toplevel

  if _wants_distributed():
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
    logging.info('jax.distributed: process %d of %d', jax.process_index(),
                 jax.process_count())

  platform = jax.devices()[0].platform
  if FLAGS.platform and platform != FLAGS.platform:
    raise LaunchError(
        f'--platform={FLAGS.platform} was requested but JAX runs on {platform!r} '
        f'({jax.device_count()} devices). Check the accelerator drivers and the jax '
        'install (pip install -e ".[gpu]" or ".[tpu]").')
  if jax.device_count() < FLAGS.min_devices:
    raise LaunchError(
        f'--min_devices={FLAGS.min_devices} but only {jax.device_count()} '
        f'{platform} devices were found.')


def _user_errors() -> tuple[type[Exception], ...]:
  """Returns the exceptions that mean bad input and get a one-line message."""
  # pylint: disable=import-outside-toplevel
  from mcd_jax import checkpointing, config_base, experiment, inference, sharding, train
  from mcd_jax import workdir
  from mcd_jax.data import corpus
  return (config_base.ConfigError, corpus.DataError, checkpointing.CheckpointError,
          workdir.WorkdirError, experiment.ExperimentError, sharding.ShardingError,
          train.TrainingDivergedError, inference.PromptError, LaunchError)


def _fail(message: str) -> None:
  """Prints `message` as the one-line `error:` output and exits with status 1."""
  one_line = ' '.join(message.split())
  print(f'error: {one_line} (add --debug for the traceback)', file=sys.stderr)
  sys.exit(1)


def _unknown_override(argv: list[str]) -> str | None:
  """Returns a message for the first --config.KEY override that names no config key."""
  # pylint: disable=import-outside-toplevel
  from mcd_jax import config_base
  known = config_base.flat_keys()
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    if key not in known:
      return f'--config.{key}: {config_base.unknown_key_message(key)}'
  return None


def _config_path_argument(argv: list[str]) -> str:
  """Returns the file part of the --config argument (before ':'), or '' without one."""
  for index, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):].split(':', 1)[0]
    if arg == '--config' and index + 1 < len(argv):
      return argv[index + 1].split(':', 1)[0]
  return ''


def _config_file_error(error: Exception, argv: list[str]) -> str:
  """Describes an exception raised while loading the config file, with its line."""
  text = str(error)
  path = os.path.abspath(_config_path_argument(argv))
  if 'Error whilst parsing config file' in text:
    # ml_collections re-raises TypeError and ValueError with the traceback as text.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line_numbers = re.findall(rf'File "{re.escape(path)}", line (\d+)', text)
    where = f' (at {path} line {line_numbers[-1]})' if line_numbers else ''
    return lines[-1] + where

  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    try:  # ml_collections puts the repr() of a KeyError message into AttributeError.
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  where = ''
  frames = [frame for frame in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(frame.filename) == path]
  if frames:
    where = f' at {path} line {frames[-1].lineno}'
  return f'{type(error).__name__}{where}: {text}'


def _flag_value_error(error: Exception) -> str:
  """Adds the expected type to absl's message for an invalid --config.KEY value."""
  # pylint: disable=import-outside-toplevel
  from mcd_jax import config_base
  match = re.match(r'flag --config\.([\w.]+)=', str(error))
  defaults = config_base.flat_defaults()
  if match and match.group(1) in defaults:
    expected = type(defaults[match.group(1)]).__name__
    return f'{error}. --config.{match.group(1)} takes a value of type {expected}.'
  return f'{error}. Run with --help for the flags.'


_HELP_FLAGS = {'--help', '-h', '-?', '--helpshort', '--helpfull'}


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags; bad flag values and config overrides print one `error:` line.

  absl prints its own message for flag errors, but an unknown --config.KEY or
  an exception raised inside a config file reaches it as a traceback.
  """
  try:
    return FLAGS(argv)
  except SystemExit:
    if _HELP_FLAGS.intersection(argv[1:]):
      sys.exit(0)  # absl exits with status 1 after printing the help.
    raise
  except Exception as error:  # pylint: disable=broad-except
    # Any exception here comes from a flag value or from running the config
    # file, both user input. --debug is read from argv because FLAGS did not parse.
    if '--debug' in argv:
      raise
    if isinstance(error, (AttributeError, KeyError)):
      message = _unknown_override(argv)
      if message:
        _fail(message)
    if isinstance(error, flags.Error) and 'Error whilst parsing config file' not in str(error):
      _fail(_flag_value_error(error))
    _fail(f'could not load the config ({_config_file_error(error, argv)}). Fix the config file '
          'or the --config.KEY=VALUE overrides.')
  return []  # Not reached: _fail exits.


def _load_config():
  """Returns FLAGS.config; a config file that could not be read raises ConfigError."""
  # pylint: disable=import-outside-toplevel
  from mcd_jax import config_base
  config = FLAGS.config
  try:
    config.keys()  # ml_collections raises a config file's OSError at first use.
  except OSError as error:
    path = config_flags.get_config_filename(FLAGS['config'])
    reason = 'not found' if not os.path.exists(path) else f'unreadable ({error})'
    raise config_base.ConfigError(
        f'Config file {path!r} {reason}. Pass a path such as configs/bible_char.py; the '
        f'shipped configs are {", ".join(shipped_configs())}.') from error
  return config


def run_mode(config, workdir: str, mode: str):
  # pylint: disable=import-outside-toplevel
  if mode == 'train':
    from mcd_jax import train
    return train.train_and_evaluate(config, workdir,
                                    allow_config_change=FLAGS.allow_config_change)
  if mode == 'pipeline':
    from mcd_jax import pipeline
    return pipeline.run_pipeline(config, workdir)
  if mode == 'evaluate':
    from mcd_jax import quality
    return quality.evaluate(config, workdir)
  from mcd_jax import inference
  return inference.sample_workdir(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  missing = [f'--{name}' for name in ('config', 'workdir') if FLAGS[name].value is None]
  if missing:
    configs = '\n  '.join(shipped_configs())
    raise app.UsageError(
        f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} missing; both '
        '--config and --workdir are required, e.g.\n'
        '  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible\n'
        f'Shipped configs (in configs/):\n  {configs}')

  python_logging.getLogger('absl').setLevel(python_logging.INFO)
  logging.set_verbosity(logging.INFO)
  # The config is checked before JAX and the model code are imported, so a
  # typo costs about a second.
  from mcd_jax import config_base  # pylint: disable=import-outside-toplevel
  try:
    config = _load_config()
    config_base.validate(config)
  except config_base.ConfigError as error:
    if FLAGS.debug:
      raise
    _fail(str(error))

  errors = _user_errors()
  try:
    initialize_runtime()
    result = run_mode(config, FLAGS.workdir, FLAGS.mode)
  except errors as error:
    if FLAGS.debug:
      raise
    _fail(str(error))

  stopped_by = result.get('stopped_by') if isinstance(result, dict) else None
  if stopped_by:
    print(f'stopped by {stopped_by} at step {result["step"]} after saving a checkpoint; '
          'run the same command to resume.', file=sys.stderr)
    sys.exit(128 + signal.Signals[stopped_by].value)


FLAGS = flags.FLAGS


def run():
  """Console-script entry point (`mcd-jax`)."""
  flags.FLAGS.set_default('mode', 'train')
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
