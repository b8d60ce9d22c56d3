"""Orbax checkpoints: train state, data iterator, run metadata and round state.

A checkpoint step holds up to four items:
  state    the TrainState (params, optimizer state, EMA params, step);
  data     the training iterator's state, so resume replays no batch;
  meta     JSON: task, config fingerprint, tokenizer fingerprint, schedule;
  teacher  (distillation only) the current round's teacher parameters.
Orbax writes each step to a temporary folder and renames it when complete, so a
crash mid-save leaves the previous step as the latest complete one.
"""

import contextlib
import json
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


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
    logging.info('Saved checkpoint at step %d to %s', step, manager.directory)
  return saved


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
  try:
    with _quiet_orbax():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError, OSError) as error:
    raise CheckpointError(
        f'Checkpoint step {step} in {manager.directory} could not be restored: '
        f'{type(error).__name__}: {error}. The checkpoint is corrupt, truncated or was '
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
