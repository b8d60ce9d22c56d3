r"""Command line of mcd_jax.

  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible
  python -m mcd_jax.main --config configs/bible_char.py:smoke --workdir /tmp/smoke
  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible --mode sample

Modes:
  train     train config.task (diffusion, autoregressive or distill) in --workdir,
            resuming from its latest checkpoint; then evaluate and write samples.
  evaluate  validation ELBO (or AR perplexity) of the checkpoint in --workdir.
  sample    write samples of the checkpoint in --workdir with config.sampling.
  pipeline  the main MCD job: teacher (unless distill.teacher_workdir is set),
            AR evaluator, MCD and SDTT students, then the quality-speed table.

Override any config key: --config.train.num_steps=200 --config.model.dtype=bfloat16.
Errors print one message; --debug shows the traceback.
"""

import glob
import logging as python_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')
_MODES = ('train', 'evaluate', 'sample', 'pipeline')

config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with ":smoke" for the one-minute variant.',
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


def shipped_configs() -> list[str]:
  return sorted(os.path.basename(path)
                for path in glob.glob(os.path.join(_REPO_CONFIGS, '*.py'))
                if not os.path.basename(path).startswith('_'))


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
  """The exceptions that mean bad input and get a one-line message."""
  # pylint: disable=import-outside-toplevel
  from mcd_jax import checkpointing, config_base, experiment, sharding, train, workdir
  from mcd_jax.data import corpus
  return (config_base.ConfigError, corpus.DataError, checkpointing.CheckpointError,
          workdir.WorkdirError, experiment.ExperimentError, sharding.ShardingError,
          train.TrainingDivergedError, LaunchError)


def run_mode(config, workdir: str, mode: str):
  # pylint: disable=import-outside-toplevel
  if mode == 'train':
    from mcd_jax import train
    return train.train_and_evaluate(config, workdir,
                                    allow_config_change=FLAGS.allow_config_change)
  if mode == 'pipeline':
    from mcd_jax import pipeline
    return pipeline.run_pipeline(config, workdir)
  from mcd_jax import inference
  if mode == 'evaluate':
    return inference.evaluate_workdir(config, workdir)
  return inference.sample_workdir(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    configs = '\n  '.join(shipped_configs())
    raise app.UsageError(
        'Both --config and --workdir are required, e.g.\n'
        '  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible\n'
        f'Shipped configs (in configs/):\n  {configs}')

  python_logging.getLogger('absl').setLevel(python_logging.INFO)
  logging.set_verbosity(logging.INFO)
  errors = _user_errors()
  try:
    initialize_runtime()
    run_mode(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except errors as error:
    if FLAGS.debug:
      raise
    print(f'error: {error}', file=sys.stderr)
    print('(run again with --debug for the traceback)', file=sys.stderr)
    sys.exit(1)


FLAGS = flags.FLAGS


def run():
  """Console-script entry point (`mcd-jax`)."""
  flags.FLAGS.set_default('mode', 'train')
  app.run(main)


if __name__ == '__main__':
  app.run(main)
