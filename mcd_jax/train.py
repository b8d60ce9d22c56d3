"""The one trainer: masked-diffusion teacher, autoregressive evaluator, distillation.

`train_and_evaluate(config, workdir)` runs every task on the same path. The
state is created already sharded on the mesh, and each step is jitted with the
state donated. Orbax checkpoints the state with the data iterator. A
distillation run also checkpoints its round's teacher, so it resumes mid-round.
"""

import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mcd_jax import checkpointing
from mcd_jax import config_base
from mcd_jax import experiment
from mcd_jax import metrics as metrics_lib
from mcd_jax import sharding
from mcd_jax import train_state as train_state_lib
from mcd_jax import workdir as workdir_lib
from mcd_jax.distill import rounds


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or Inf; the message names the steps and the last checkpoint."""


class _StopSignal:
  """Turns SIGTERM and SIGINT into a request to save and exit at the next step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for number in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[number] = signal.signal(number, self._handle)
      except ValueError:  # Not the main thread (a notebook's worker, a test thread).
        pass
    return self

  def _handle(self, number, frame):
    del frame
    if self.received is not None:  # A second signal stops at once.
      raise KeyboardInterrupt
    self.received = signal.Signals(number).name
    logging.warning('Received %s: saving a checkpoint and stopping.', self.received)

  def agreed(self, step: int, every: int) -> bool:
    """Decides whether to stop now; with several processes, all decide together.

    The save that follows a stop is collective, so processes must stop at the
    same step. They compare their flags every `every` steps, which delays a
    stop by at most that many steps.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if flags.max() and self.received is None:
      self.received = 'SIGTERM'  # Another process received the signal.
    return bool(flags.max())

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    return False


def make_train_step(objective, tx, ema_rate: float, state_shardings, batch_sharding,
                    teacher_shardings, mesh):
  """Jits one optimizer step; the state is donated, the teacher is an argument."""
  replicated = sharding.replicated(mesh)

  def train_step(state, tokens, rng, teacher_params, delta):
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      return objective.loss_fn(params, tokens, step_rng, teacher_params, delta)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = train_state_lib.update_ema(state.ema_params, params, ema_rate)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    step_metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
    return new_state, step_metrics

  return jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_sharding, replicated, teacher_shardings,
                    replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )


def evaluate(eval_fn, params, rows: np.ndarray, batch_size: int, max_batches: int,
             rng, mesh) -> float:
  """Returns validation bits per token, aggregated over tokens (not batches)."""
  jitted = jax.jit(eval_fn)
  total_nats, total_tokens = 0.0, 0.0
  num_batches = min(max_batches, len(rows) // batch_size)
  process, processes = jax.process_index(), jax.process_count()
  local = batch_size // processes
  for index in range(num_batches):
    batch = rows[index * batch_size:(index + 1) * batch_size]
    local_rows = batch[process * local:(process + 1) * local]
    tokens = sharding.global_batch_from_local(local_rows, mesh)
    nats, count = jitted(params, tokens, jax.random.fold_in(rng, index))
    total_nats += float(nats)
    total_tokens += float(count)
  if total_tokens == 0:
    return float('nan')
  return total_nats / total_tokens / math.log(2)


def evaluation_rng(seed: int):
  """Returns the key of validation ELBO draws, shared by training and --mode evaluate."""
  return jax.random.split(jax.random.key(seed), 4)[2]


def _check_finite(step_metrics: dict[str, float], first_step: int, step: int,
                  last_checkpoint: int | None) -> None:
  bad = {name: value for name, value in step_metrics.items() if not math.isfinite(value)}
  if bad:
    kept = (f'the last good checkpoint is step {last_checkpoint}'
            if last_checkpoint is not None else 'no checkpoint was written')
    raise TrainingDivergedError(
        f'Training diverged: {bad} between steps {first_step} and {step}; {kept}. '
        'Lower optim.learning_rate or optim.grad_clip, or use float32.')


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(history)
  return {name: float(np.mean([entry[name] for entry in fetched])) for name in fetched[0]}


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint."""

  # ---- Config and workdir ----
  config_base.validate(config)
  run = experiment.setup(config, workdir, allow_config_change=allow_config_change)
  config, mesh = run.config, run.mesh
  is_distill = config.task == 'distill'
  num_steps = config.train.num_steps
  if is_distill:
    schedule_of_rounds = rounds.RoundSchedule(
        config.distill.base_steps, config.distill.num_rounds, config.distill.steps_per_round)

  # ---- State, created sharded or restored ----
  tx = train_state_lib.make_optimizer(config.optim, num_steps)
  abstract_state, state_shardings = train_state_lib.abstract_state_and_shardings(
      run.model, tx, mesh, config.mesh.axis_rules, config.data.seq_len)
  teacher_shardings = state_shardings.params if is_distill else None
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir),
                                       keep=config.train.keep_checkpoints)
  init_rng, train_rng, eval_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 4)

  teacher_params = None
  if manager.latest_step() is not None:
    abstract_teacher = abstract_state.params if is_distill else None
    restored = checkpointing.restore(manager, abstract_state, abstract_teacher)
    experiment.check_meta(restored['meta'], run.meta, workdir)
    state = restored['state']
    run.datasets.train_iterator.set_state(restored['data'])
    teacher_params = restored.get('teacher')
    logging.info('Resuming %s at step %d.', config.task, int(state.step))
  else:
    state, _ = train_state_lib.create_state(run.model, tx, init_rng, mesh,
                                            config.mesh.axis_rules, config.data.seq_len,
                                            shardings=state_shardings)
    if is_distill:
      # Round 0: student and teacher both start from the trained teacher.
      # Copies, because the state's buffers are donated to every step.
      teacher_params = run.initial_teacher_params
      copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
      state = state.replace(params=copy(teacher_params), ema_params=copy(teacher_params))
      state = jax.device_put(state, state_shardings)
  run.initial_teacher_params = None  # Free the host reference.

  sharding.check_memory(experiment.memory_estimate(
      config, state, state_shardings, has_teacher=is_distill,
      vocab_size=run.meta['vocab_size']))
  train_step = make_train_step(run.objective, tx, config.optim.ema_rate, state_shardings,
                               sharding.batch_sharding(mesh), teacher_shardings, mesh)

  # ---- Training loop ----
  writer = metrics_lib.MetricWriter(workdir)
  start_step = int(state.step)
  progress = metrics_lib.Progress(num_steps, start_step, config.task, config.train.log_every)
  history, window_start = [], start_step
  last_checkpoint = manager.latest_step()
  step = start_step
  step_time = time.time()

  def save(step, force=False):
    nonlocal last_checkpoint
    saved = checkpointing.save(manager, step, state, run.datasets.train_iterator.get_state(),
                               run.meta, teacher_params=teacher_params, force=force)
    if saved:
      last_checkpoint = step

  with _StopSignal() as stop:
    while step < num_steps and not stop.agreed(step, config.train.log_every):
      delta = 0.0
      if is_distill:
        round_index, step_in_round = schedule_of_rounds.round_for_step(step)
        if step_in_round == 0 and step > 0:
          teacher_params = jax.tree_util.tree_map(jnp.copy, state.params)
          logging.info('Round %d starts at step %d: the teacher is now the student.',
                       round_index, step)
        delta = schedule_of_rounds.delta(round_index)

      batch = sharding.global_batch_from_local(next(run.datasets.train_iterator), mesh)
      state, step_metrics = train_step(state, batch, train_rng, teacher_params,
                                       jnp.float32(delta))
      history.append(step_metrics)
      step += 1

      should_log = step % config.train.log_every == 0 or step == num_steps
      should_save = step % config.train.checkpoint_every == 0 or step == num_steps
      if should_log or should_save:
        scalars = _mean_metrics(history)
        _check_finite(scalars, window_start, step, last_checkpoint)
        elapsed = time.time() - step_time
        scalars['steps_per_second'] = len(history) / max(elapsed, 1e-9)
        if is_distill:
          scalars['round'] = float(schedule_of_rounds.round_for_step(step - 1)[0])
        history, window_start, step_time = [], step, time.time()
        writer.write(step, scalars)
        progress.update(step, scalars)
      else:
        progress.update(step)

      if step % config.train.eval_every == 0 and step < num_steps:
        value = evaluate(run.objective.eval_fn, state.ema_params,
                         run.datasets.validation_rows, config.data.batch_size,
                         config.train.eval_batches, eval_rng, mesh)
        writer.write(step, {f'val_{run.objective.eval_name}': value})
        logging.info('Step %d: validation %s = %.4f (EMA parameters)', step,
                     run.objective.eval_name, value)

      if should_save:
        save(step)
      if config.train.sample_every and step % config.train.sample_every == 0:
        experiment.write_samples(run, state.ema_params, sample_rng, step, workdir)

    if stop.received is not None:
      if history:
        _check_finite(_mean_metrics(history), window_start, step, last_checkpoint)
      if last_checkpoint != step:
        save(step, force=True)
      progress.close()
      writer.close()
      logging.info('Stopped by %s at step %d; the checkpoint is in %s. Run the same '
                   'command to resume.', stop.received, step,
                   workdir_lib.checkpoint_dir(workdir))
      return {'step': step, 'stopped_by': stop.received}

  progress.close()
  if last_checkpoint != step:
    if history:
      _check_finite(_mean_metrics(history), window_start, step, last_checkpoint)
    save(step, force=True)

  # ---- Final evaluation and samples ----
  value = evaluate(run.objective.eval_fn, state.ema_params, run.datasets.validation_rows,
                   config.data.batch_size, config.train.eval_batches, eval_rng, mesh)
  writer.write(step, {f'val_{run.objective.eval_name}': value})
  sample_paths = experiment.write_samples(run, state.ema_params, sample_rng, step, workdir)
  writer.close()
  summary = {
      'task': config.task,
      'step': step,
      f'val_{run.objective.eval_name}': value,
      'workdir': os.path.abspath(workdir),
      'checkpoints': workdir_lib.checkpoint_dir(workdir),
      'metrics': os.path.join(workdir, 'metrics.jsonl'),
      'samples': sample_paths,
  }
  experiment.log_summary(summary)
  return summary
