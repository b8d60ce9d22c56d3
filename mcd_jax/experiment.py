"""Run setup: mesh, data, model, objective and teacher, built before the first step.

Also the pieces the trainer shares with the other modes: the checkpoint
metadata check, the memory estimate, sample writing and the closing summary.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mcd_jax import checkpointing
from mcd_jax import config_base
from mcd_jax import metrics as metrics_lib
from mcd_jax import objectives
from mcd_jax import sampling
from mcd_jax import schedules
from mcd_jax import sharding
from mcd_jax import train_state as train_state_lib
from mcd_jax import workdir as workdir_lib
from mcd_jax.data import pipeline
from mcd_jax.models import transformer


class ExperimentError(ValueError):
  """A run that cannot start: a wrong teacher, a mismatched tokenizer, and so on."""


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  datasets: Any
  model: nn.Module
  schedule: schedules.Schedule
  objective: objectives.Objective
  meta: dict
  initial_teacher_params: Any = None


def build_model(config, vocab_size: int) -> nn.Module:
  """Builds the transformer for `config.task`: causal for the AR task, else bidirectional."""
  causal = config.task == 'autoregressive'
  input_size = vocab_size if causal else vocab_size + 1  # + the mask token.
  return transformer.from_config(config.model, vocab_size=input_size,
                                 output_size=vocab_size, causal=causal)


def run_meta(config, tokenizer) -> dict:
  return {
      'task': config.task,
      'schedule': config.diffusion.schedule,
      'vocab_size': int(tokenizer.vocab_size),
      'tokenizer_fingerprint': tokenizer.fingerprint(),
      'seq_len': int(config.data.seq_len),
      'model': json.loads(config.model.to_json()),
  }


def check_meta(saved: dict, current: dict, workdir: str) -> None:
  """Raises ExperimentError when a checkpoint was written by another kind of run."""
  # Model keys added to mcd_jax after the checkpoint was written take their defaults.
  saved = dict(saved)
  saved['model'] = dict(json.loads(config_base.base_config().model.to_json()),
                        **saved.get('model', {}))
  for key in ('task', 'vocab_size', 'tokenizer_fingerprint', 'seq_len', 'model', 'schedule'):
    if saved.get(key) != current.get(key):
      raise ExperimentError(
          f'The checkpoint in {workdir} has {key}={saved.get(key)!r} but this run has '
          f'{key}={current.get(key)!r}. Use a new --workdir for a different model, '
          'tokenizer or task.')


def _load_teacher(config, mesh):
  """Reads the teacher's config, tokenizer folder and EMA parameters."""
  teacher_dir = config.distill.teacher_workdir
  if not teacher_dir:
    raise ExperimentError(
        'distill.teacher_workdir is empty. Set it to the --workdir of a trained masked '
        'diffusion teacher (task "diffusion").')
  teacher_config = workdir_lib.load_config(teacher_dir)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(teacher_dir), keep=1000)
  meta = checkpointing.read_meta(manager)
  if meta is None:
    raise ExperimentError(f'No checkpoint found in the teacher workdir {teacher_dir}.')
  if meta['task'] != 'diffusion':
    raise ExperimentError(
        f'The checkpoint in {teacher_dir} is a {meta["task"]!r} model, but a teacher '
        'must be a masked diffusion model (task "diffusion"). Point '
        'distill.teacher_workdir at a teacher workdir.')
  return teacher_config, manager, meta


def setup(config, workdir: str, allow_config_change: bool = False) -> Run:
  """Builds mesh, data, model and objective; loads the teacher for distillation."""
  config = ml_collections.ConfigDict(config.to_dict())
  mesh = sharding.create_mesh(config.mesh.shape)
  logging.info('Mesh %s over %d devices (%s), %d processes.', dict(mesh.shape),
               mesh.devices.size, jax.devices()[0].platform, jax.process_count())

  teacher = None
  tokenizer_dir = workdir_lib.tokenizer_dir(workdir)
  if config.task == 'distill':
    teacher_config, teacher_manager, teacher_meta = _load_teacher(config, mesh)
    # Data, model and schedule come from the teacher, so a student can never
    # be trained with another schedule or tokenizer than its teacher.
    student_batch_size = config.data.batch_size
    defaults = config_base.base_config()
    for section in ('data', 'model', 'diffusion'):
      teacher_section = ml_collections.ConfigDict(teacher_config[section].to_dict())
      for key, value in config[section].items():
        # Warn about values set on purpose: neither the default nor the teacher's.
        chosen = value != defaults[section][key] and value != teacher_section.get(key)
        if key != 'batch_size' and chosen:
          logging.warning('%s.%s=%r is ignored: a student uses its teacher\'s %r.',
                          section, key, value, teacher_section.get(key))
      config[section] = teacher_section
    config.data.batch_size = student_batch_size
    teacher = (teacher_manager, teacher_meta)
    if jax.process_index() == 0 and not os.path.exists(tokenizer_dir):
      shutil.copytree(workdir_lib.tokenizer_dir(config.distill.teacher_workdir),
                      tokenizer_dir)
    multihost_utils.sync_global_devices('tokenizer copied')

  workdir_lib.prepare(workdir, config, allow_config_change, jax.process_index() == 0)
  datasets = pipeline.make_datasets(config.data, tokenizer_dir, jax.process_index(),
                                    jax.process_count())
  vocab_size = datasets.tokenizer.vocab_size
  model = build_model(config, vocab_size)
  schedule = schedules.get_schedule(config.diffusion.schedule)
  objective = objectives.make_objective(config, model, schedule, vocab_size)
  meta = run_meta(config, datasets.tokenizer)
  run = Run(config, mesh, datasets, model, schedule, objective, meta)

  if teacher is not None:
    teacher_manager, teacher_meta = teacher
    if teacher_meta['tokenizer_fingerprint'] != meta['tokenizer_fingerprint']:
      raise ExperimentError('The teacher checkpoint was trained with another tokenizer.')
    run.initial_teacher_params = load_params(teacher_manager, config, model, mesh)
  return run


def load_params(manager, config, model, mesh, use_ema: bool = True, step: int | None = None):
  """Restores the (EMA) parameters of checkpoint `step` (default: latest) onto `mesh`."""
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  abstract_state, _ = train_state_lib.abstract_state_and_shardings(
      model, tx, mesh, config.mesh.axis_rules, config.data.seq_len)
  restored = checkpointing.restore(manager, abstract_state, step=step)
  state = restored['state']
  return state.ema_params if use_ema else state.params


def memory_estimate(config, state, state_shardings, has_teacher: bool,
                    vocab_size: int = 0) -> dict[str, int]:
  """Estimates the bytes per device of each part of a training step (an estimate)."""
  params = sharding.bytes_per_device(state.params, state_shardings.params)
  estimate = {
      'student params' if has_teacher else 'params': params,
      'gradients': params,
      'EMA params': sharding.bytes_per_device(state.ema_params, state_shardings.ema_params),
      'optimizer state': sharding.bytes_per_device(state.opt_state, state_shardings.opt_state),
  }
  if has_teacher:
    estimate['teacher params'] = params
  dtype_bytes = 2 if config.model.dtype == 'bfloat16' else 4
  # The batch is split over the data and fsdp axes of the mesh.
  data, fsdp, _ = sharding.mesh_shape(config.mesh.shape, jax.device_count())
  per_device = max(1, config.data.batch_size // (data * fsdp))
  forward_passes = 2 if has_teacher else 1
  estimate['activations'] = forward_passes * sharding.activation_bytes_estimate(
      per_device, config.data.seq_len, config.model.d_model, config.model.mlp_dim,
      config.model.num_layers, config.model.num_heads, dtype_bytes, config.model.remat)
  # float32 logits and their log-softmax (or gradient), per forward pass; with a
  # large vocabulary these dominate the activations.
  estimate['logits'] = forward_passes * 2 * per_device * config.data.seq_len * vocab_size * 4
  return estimate


def write_samples(run: Run, params, rng, step: int, workdir: str) -> dict[str, str]:
  """Samples with `config.sampling`, writes text and JSONL; returns their paths."""
  config = run.config
  if config.task == 'autoregressive':
    return {}
  settings = config.sampling
  tokens, nfe = sample_tokens(
      run.model, params, rng, sampler=settings.sampler, num_samples=settings.num_samples,
      batch_size=settings.batch_size, num_steps=settings.num_steps,
      temperature=settings.temperature, seq_len=config.data.seq_len, schedule=run.schedule,
      vocab_size=run.datasets.tokenizer.vocab_size,
      time_conditioned=config.model.time_conditioning)
  texts = [run.datasets.tokenizer.decode(row) for row in tokens]
  paths = {}
  if jax.process_index() == 0:
    directory = workdir_lib.samples_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    paths['text'] = os.path.join(directory, f'step_{step}.txt')
    paths['jsonl'] = os.path.join(directory, f'step_{step}.jsonl')
    with open(paths['text'], 'w', encoding='utf-8') as f:
      for index, text in enumerate(texts):
        f.write(f'===== sample {index} =====\n{text}\n')
    with open(paths['jsonl'], 'w', encoding='utf-8') as f:
      for index, (text, spent) in enumerate(zip(texts, nfe)):
        f.write(json.dumps({'step': step, 'index': index, 'nfe': int(spent),
                            'sampler': config.sampling.sampler,
                            'num_steps': config.sampling.num_steps,
                            'temperature': config.sampling.temperature,
                            'text': text}) + '\n')
    logging.info('Wrote %d samples to %s', len(texts), paths['text'])
  return paths


def sample_tokens(model, params, rng, *, sampler: str, num_samples: int, batch_size: int,
                  num_steps: int, temperature: float, seq_len: int, schedule,
                  vocab_size: int, time_conditioned: bool, prefix=None):
  """Draws `num_samples` sequences in batches; returns host int32[N, L] and NFE[N].

  Batch b uses `fold_in(rng, offset)` (ancestral) or the sample indices
  offset, offset + 1, ... (deterministic), so the texts do not depend on
  `batch_size` for the deterministic sampler.
  """
  if sampler not in ('ancestral', 'deterministic'):
    raise ValueError(f"Unknown sampler {sampler!r}; choose 'ancestral' or 'deterministic'.")
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f'num_samples ({num_samples}) and batch_size ({batch_size}) must be '
                     'at least 1.')
  all_tokens, all_nfe = [], []
  progress = metrics_lib.Progress(num_samples, 0, 'sampling', log_every=1)
  for offset in range(0, num_samples, batch_size):
    size = min(batch_size, num_samples - offset)
    settings = dict(batch_size=size, seq_len=seq_len, num_steps=num_steps,
                    schedule=schedule, mask_id=vocab_size, temperature=temperature,
                    time_conditioned=time_conditioned, prefix=prefix)
    if sampler == 'deterministic':
      output = sampling.deterministic_sample(model, params, rng, sample_offset=offset,
                                             **settings)
    else:
      output = sampling.ancestral_sample(model, params, jax.random.fold_in(rng, offset),
                                         **settings)
    all_tokens.append(np.asarray(multihost_utils.process_allgather(output.tokens,
                                                                   tiled=True)))
    all_nfe.append(np.asarray(multihost_utils.process_allgather(output.nfe, tiled=True)))
    done = offset + size
    progress.update(done, {'samples': done, 'mean_nfe': float(np.mean(all_nfe[-1]))})
  progress.close()
  return np.concatenate(all_tokens), np.concatenate(all_nfe)


def log_summary(summary: dict) -> None:
  if jax.process_index() != 0:
    return
  lines = [f'  {name}: {value}' for name, value in summary.items()]
  logging.info('Run finished. Written:\n%s', '\n'.join(lines))
