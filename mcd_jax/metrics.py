"""Metric writers (JSONL and TensorBoard) and a progress display with ETA.

Only process 0 writes; other processes get writers that do nothing, so the
trainer calls them unconditionally.
"""

import json
import math
import os
import sys
import time

from absl import logging
import jax
import tqdm


class MetricWriter:
  """Appends scalars to `metrics.jsonl` and to TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.warning('tensorboardX is not installed; metrics go to metrics.jsonl only.')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({name: float(value) for name, value in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in scalars.items():
        self._tensorboard.add_scalar(name, float(value), int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def format_scalars(scalars: dict[str, float]) -> str:
  parts = []
  for name, value in scalars.items():
    parts.append(f'{name}={value:.4g}' if math.isfinite(value) else f'{name}={value}')
  return ' '.join(parts)


class Progress:
  """A tqdm bar with ETA on a terminal; plain log lines with ETA elsewhere."""

  def __init__(self, total: int, initial: int, description: str, log_every: int):
    self.total = total
    self.log_every = max(1, log_every)
    self.description = description
    self._start_time = time.time()
    self._start_step = initial
    self._bar = None
    if jax.process_index() == 0 and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=description,
                            dynamic_ncols=True, leave=True)

  def update(self, step: int, scalars: dict[str, float] | None = None) -> None:
    """Advances to `step`; shows `scalars` when given (at logging steps)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if scalars:
        self._bar.set_postfix_str(format_scalars(scalars))
      return
    if scalars is not None and jax.process_index() == 0:
      logging.info('%s step %d/%d %s (ETA %s)', self.description, step, self.total,
                   format_scalars(scalars), self.eta(step))

  def eta(self, step: int) -> str:
    done = step - self._start_step
    if done <= 0:
      return '?'
    seconds = (time.time() - self._start_time) / done * (self.total - step)
    return time.strftime('%H:%M:%S', time.gmtime(max(0.0, seconds)))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
