"""Layout of a workdir and the check that a resumed run matches its config.

  DIR/config.json     the config of the run that created DIR
  DIR/tokenizer/      the tokenizer, saved with the first checkpoint
  DIR/checkpoints/    Orbax steps
  DIR/metrics.jsonl   scalars; DIR/tensorboard/ the same for TensorBoard
  DIR/samples/        sample texts (.txt) and records (.jsonl)
"""

import json
import os
import shutil

from absl import logging
import ml_collections

from mcd_jax import config_base

# Keys that may change between a run and its resumption: intervals, sampling
# settings and the mesh, none of which changes what is trained. train.num_steps
# is not among them because the learning-rate decay is scaled to it.
RESUMABLE_PREFIXES = ('train.log_every', 'train.eval_every', 'train.eval_batches',
                      'train.checkpoint_every', 'train.keep_checkpoints',
                      'train.sample_every', 'sampling.', 'mesh.', 'pipeline.',
                      'distill.teacher_workdir')


class WorkdirError(ValueError):
  """A workdir that cannot be used with the requested config."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, 'samples')


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """Returns the config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads DIR/config.json; raises WorkdirError when it is missing or unreadable."""
  path = config_path(workdir)
  try:
    with open(path, encoding='utf-8') as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError as error:
    raise WorkdirError(
        f'{path} not found: {workdir!r} is not a workdir written by mcd_jax. Pass the '
        '--workdir of a finished training run.') from error
  except json.JSONDecodeError as error:
    raise WorkdirError(f'{path} is not valid JSON ({error}).') from error


def has_checkpoint(workdir: str) -> bool:
  """Returns whether DIR/checkpoints has a finished step (Orbax names it by its number)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return False
  return any(name.isdigit() for name in os.listdir(directory))


def config_differences(saved: dict, current: dict) -> list[str]:
  """Lists `key: saved -> current` for keys that change what a run trains."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  # A key added to mcd_jax after the workdir was written has its default there.
  defaults = json.loads(json.dumps(config_base.flat_defaults()))
  differences = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key.startswith(RESUMABLE_PREFIXES):
      continue
    old, new = saved_flat.get(key, defaults.get(key, '<absent>')), current_flat.get(key, '<absent>')
    if old != new:
      differences.append(f'{key}: {old!r} -> {new!r}')
  return differences


def prepare(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool,
            is_writer: bool) -> None:
  """Creates the workdir or checks that it was made by an equivalent config."""
  current = config_to_dict(config)
  path = config_path(workdir)
  if os.path.exists(path):
    saved = load_config(workdir).to_dict()
    differences = config_differences(saved, current)
    if differences and not has_checkpoint(workdir):
      # A run that failed before its first checkpoint trained nothing, so its
      # config (and a tokenizer built from its data) may be replaced.
      logging.warning('Replacing the config of %s, which has no checkpoint: %s', workdir,
                      '; '.join(differences))
      if (is_writer and config.task != 'distill'
          and any(line.startswith('data.') for line in differences)
          and os.path.isdir(tokenizer_dir(workdir))):
        logging.warning('Removing %s, built from the previous data config.',
                        tokenizer_dir(workdir))
        shutil.rmtree(tokenizer_dir(workdir))
    elif differences and not allow_config_change:
      listing = '; '.join(differences)
      raise WorkdirError(
          f'The workdir {workdir} was created with a different config ({listing}). Use a '
          'new --workdir, or pass --allow_config_change to resume anyway.')
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    temporary = path + '.tmp'
    with open(temporary, 'w', encoding='utf-8') as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(temporary, path)
