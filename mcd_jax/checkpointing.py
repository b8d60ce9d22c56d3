"""Orbax checkpoints: train state, data iterator, run metadata and round state.

A checkpoint step holds up to four items:
  state    the TrainState (params, optimizer state, EMA params, step);
  data     the training iterator's state, so resume replays no batch;
  meta     JSON: task, config fingerprint, tokenizer fingerprint, schedule;
  teacher  (distillation only) the current round's teacher parameters.
Orbax writes each step to a temporary folder and renames it when complete, so a
crash mid-save leaves the previous step as the latest complete one. After the
rename, process 0 writes STEP/mcd_checksums.json with the size and SHA-256 of
every file of the step, and `restore` checks them first, because Orbax loads a
flipped byte in an array file without error.
"""

import contextlib
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


CHECKSUM_FILE = 'mcd_checksums.json'


class CheckpointError(ValueError):
  """A missing, corrupt or mismatched checkpoint."""


@contextlib.contextmanager
def _quiet_orbax():
  """Hides Orbax's per-file INFO lines; this module logs one line per save instead."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(min(verbosity, logging.WARNING))  # absl: lower is quieter.
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def make_manager(directory: str, keep: int, save_interval_steps: int = 1
                ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=save_interval_steps,
      create=True,
      enable_async_checkpointing=False,
  )
  with _quiet_orbax():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         meta: dict, teacher_params: Any = None, force: bool = False) -> bool:
  """Saves one step; returns whether a checkpoint was written."""
  items = {
      'state': ocp.args.StandardSave(state),
      'data': ocp.args.JsonSave(data_state),
      'meta': ocp.args.JsonSave(meta),
  }
  if teacher_params is not None:
    items['teacher'] = ocp.args.StandardSave(teacher_params)
  with _quiet_orbax():
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      manager.wait_until_finished()
  if saved:
    if jax.process_index() == 0:
      write_checksums(step_dir(manager, step))
      logging.info('Saved checkpoint at step %d to %s', step, manager.directory)
  return saved


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _is_local(path: str) -> bool:
  return '://' not in path


def _file_checksums(directory: str) -> dict[str, dict]:
  """Maps each file under `directory` (relative path) to its size and SHA-256."""
  checksums = {}
  for root, _, names in os.walk(directory):
    for name in sorted(names):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative == CHECKSUM_FILE or relative.endswith('.tmp'):
        continue
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda f=f: f.read(1 << 20), b''):
          digest.update(block)
      checksums[relative] = {'bytes': os.path.getsize(path), 'sha256': digest.hexdigest()}
  return checksums


def write_checksums(directory: str) -> None:
  """Writes DIRECTORY/mcd_checksums.json for a finished step (local paths only)."""
  # NOTE: workdirs on object stores (gs://) get no checksums; Orbax's own
  # checks are all that protects them.
  if not _is_local(directory):
    return
  record = {'algorithm': 'sha256', 'files': _file_checksums(directory)}
  path = os.path.join(directory, CHECKSUM_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def verify_checksums(directory: str, step: int) -> None:
  """Raises CheckpointError when a file of the step is missing, truncated or changed.

  A step without a checksum file (written before checksums existed, or killed
  between Orbax's rename and the checksum write) is restored unchecked, with a
  warning.
  """
  if not _is_local(directory):
    return
  advice = (f'Delete the folder {directory} to resume from the step before it, or use '
            'a new --workdir.')
  path = os.path.join(directory, CHECKSUM_FILE)
  if not os.path.isfile(path):
    logging.warning('Checkpoint step %d has no %s; restoring it without the checksum '
                    'check.', step, CHECKSUM_FILE)
    return
  try:
    with open(path, encoding='utf-8') as f:
      expected = json.load(f)['files']
  except (OSError, ValueError, KeyError) as error:
    raise CheckpointError(
        f'Checkpoint step {step}: {path} is unreadable ({error}). {advice}') from error

  for relative, entry in sorted(expected.items()):
    file_path = os.path.join(directory, relative)
    if not os.path.isfile(file_path):
      raise CheckpointError(f'Checkpoint step {step} is incomplete: {file_path} is missing. '
                            f'{advice}')
    size = os.path.getsize(file_path)
    if size != entry['bytes']:
      raise CheckpointError(
          f'Checkpoint step {step} is truncated or altered: {file_path} has {size} bytes, '
          f'expected {entry["bytes"]}. {advice}')
  actual = _file_checksums(directory)
  for relative, entry in sorted(expected.items()):
    if actual[relative]['sha256'] != entry['sha256']:
      raise CheckpointError(
          f'Checkpoint step {step} is corrupt: {os.path.join(directory, relative)} does '
          f'not match its SHA-256 checksum. {advice}')


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """Returns the metadata of `step` (default: latest), or None without checkpoints."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  path = os.path.join(str(manager.directory), str(step), 'meta', 'metadata')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    with _quiet_orbax():
      restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']
  except (OSError, json.JSONDecodeError) as error:
    raise CheckpointError(
        f'The metadata of checkpoint step {step} in {manager.directory} is unreadable '
        f'({error}). Delete that step folder to resume from the one before.') from error


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            abstract_teacher: Any = None, step: int | None = None) -> dict:
  """Restores state (sharded as `abstract_state`), data state, meta and teacher.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings, so the
  arrays land directly on the current mesh, whatever mesh saved them.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'No checkpoint found in {manager.directory}.')

  items = {
      'state': ocp.args.StandardRestore(abstract_state),
      'data': ocp.args.JsonRestore(),
      'meta': ocp.args.JsonRestore(),
  }
  if abstract_teacher is not None:
    items['teacher'] = ocp.args.StandardRestore(abstract_teacher)
  verify_checksums(step_dir(manager, step), step)
  try:
    with _quiet_orbax():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # pylint: disable=broad-except
    # orbax-checkpoint 0.12.8 raises a bare Exception for an array file it
    # cannot read, besides ValueError, KeyError and OSError. Each means that
    # this step is unusable.
    lines = str(error).strip().splitlines()
    reason = lines[0][:300] if lines else ''
    raise CheckpointError(
        f'Checkpoint step {step} in {manager.directory} could not be restored '
        f'({type(error).__name__}: {reason}). The checkpoint is corrupt, truncated or was '
        'written by a different model; delete that step folder to resume from an earlier '
        'one, or use a new --workdir.') from error

  _check_finite(restored['state'], step, manager.directory)
  logging.info('Restored checkpoint step %d from %s', step, manager.directory)
  return dict(restored, step=step)


def _check_finite(state: Any, step: int, directory) -> None:
  """Rejects a restored state that contains NaN or Inf (an integrity check)."""
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(state)
            if hasattr(leaf, 'dtype') and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)]
  finite = all(bool(jax.numpy.isfinite(leaf).all()) for leaf in leaves)
  if not finite:
    raise CheckpointError(
        f'Checkpoint step {step} in {directory} contains NaN or Inf values. Delete that '
        'step folder to resume from an earlier one.')
