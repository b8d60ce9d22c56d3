"""Loading a trained workdir for evaluation and sampling (modes and notebooks).

  model = inference.load('/tmp/bible_char')
  texts = model.sample(num_samples=4, num_steps=64, prompt='In the beginning')
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from mcd_jax import checkpointing
from mcd_jax import experiment
from mcd_jax import objectives
from mcd_jax import sampling
from mcd_jax import schedules
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import workdir as workdir_lib
from mcd_jax.data import pipeline
from mcd_jax.data import tokenizers


class PromptError(ValueError):
  """A sampling prompt that the model cannot condition on."""


@dataclasses.dataclass
class LoadedModel:
  """A trained model with its tokenizer, schedule and (EMA) parameters."""

  config: ml_collections.ConfigDict
  model: Any
  params: Any
  tokenizer: Any
  schedule: schedules.Schedule
  mesh: jax.sharding.Mesh
  step: int

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def encode_prompt(self, prompt: str) -> np.ndarray:
    """Token ids of `prompt`; raises PromptError when it cannot be encoded or is too long."""
    try:
      ids = np.asarray(self.tokenizer.encode(prompt), np.int32)
    except pipeline.DataError as error:
      unknown = sorted(set(c for c in prompt if not self._encodes(c)))
      listing = ', '.join(repr(c) for c in unknown[:20]) or str(error)
      raise PromptError(
          f'sampling.prompt {_preview(prompt)} contains characters outside the '
          f'{self.vocab_size}-token vocabulary of this model: {listing}. Remove or '
          'replace them.') from error
    seq_len = self.config.data.seq_len
    if len(ids) >= seq_len:
      raise PromptError(
          f'sampling.prompt {_preview(prompt)} has {len(ids)} tokens but the model '
          f'generates sequences of {seq_len} (data.seq_len); shorten the prompt to at '
          f'most {seq_len - 1} tokens so at least one position is generated.')
    return ids

  def _encodes(self, character: str) -> bool:
    try:
      self.tokenizer.encode(character)
    except pipeline.DataError:
      return False
    return True

  def sample_tokens(self, rng, num_samples: int, num_steps: int, temperature: float = 1.0,
                    sampler: str = 'ancestral', prompt: str = '',
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples token ids int32[N, L] and the NFE spent per sample, in batches."""
    prefix = self.encode_prompt(prompt) if prompt else None
    return experiment.sample_tokens(
        self.model, self.params, rng, sampler=sampler, num_samples=num_samples,
        batch_size=batch_size or num_samples, num_steps=num_steps, temperature=temperature,
        seq_len=self.config.data.seq_len, schedule=self.schedule,
        vocab_size=self.vocab_size, time_conditioned=self.config.model.time_conditioning,
        prefix=prefix)

  def sample(self, num_samples: int = 4, num_steps: int = 128, temperature: float = 1.0,
             sampler: str = 'ancestral', prompt: str = '', seed: int = 0) -> list[str]:
    """Samples and decodes `num_samples` texts."""
    tokens, _ = self.sample_tokens(jax.random.key(seed), num_samples, num_steps,
                                   temperature, sampler, prompt)
    return [self.tokenizer.decode(row) for row in tokens]


def _preview(text: str, max_chars: int = 40) -> str:
  """repr() of `text`, cut to `max_chars` characters with '...' after the cut."""
  return repr(text if len(text) <= max_chars else text[:max_chars] + '...')


def load(workdir: str, step: int | None = None, use_ema: bool = True,
         mesh_shape=(-1, 1, 1)) -> LoadedModel:
  """Loads the config, tokenizer and parameters that `workdir` holds."""
  config = workdir_lib.load_config(workdir)
  tokenizer = tokenizers.load_tokenizer(workdir_lib.tokenizer_dir(workdir))
  mesh = sharding.create_mesh(mesh_shape)
  model = experiment.build_model(config, tokenizer.vocab_size)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), keep=1000)
  meta = checkpointing.read_meta(manager, step)
  if meta is None:
    raise checkpointing.CheckpointError(f'No checkpoint found in {workdir}.')
  if meta['tokenizer_fingerprint'] != tokenizer.fingerprint():
    raise checkpointing.CheckpointError(
        f'The tokenizer in {workdir_lib.tokenizer_dir(workdir)} does not match the one '
        'the checkpoint was trained with; restore the original tokenizer folder.')
  params = experiment.load_params(manager, config, model, mesh, use_ema=use_ema, step=step)
  schedule = schedules.get_schedule(config.diffusion.schedule)
  return LoadedModel(config, model, params, tokenizer, schedule, mesh,
                     manager.latest_step() if step is None else step)


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
  logging.info('Wrote %s', path)


def evaluate_workdir(config, workdir: str) -> dict:
  """Validation ELBO (diffusion) or AR bits per token of the checkpoint in `workdir`."""
  loaded = load(workdir)
  saved = loaded.config
  saved.data.batch_size = config.data.batch_size
  datasets = pipeline.make_datasets(saved.data, workdir_lib.tokenizer_dir(workdir),
                                    jax.process_index(), jax.process_count())
  objective = objectives.make_objective(saved, loaded.model, loaded.schedule,
                                        loaded.vocab_size)
  bits = train.evaluate(objective.eval_fn, loaded.params, datasets.validation_rows,
                        saved.data.batch_size, config.train.eval_batches,
                        train.evaluation_rng(config.seed), loaded.mesh)
  record = {'workdir': os.path.abspath(workdir), 'step': loaded.step, 'task': saved.task,
            objective.eval_name: bits, 'perplexity_bound': 2 ** bits,
            'eval_batches': config.train.eval_batches}
  logging.info('%s at step %d: %s = %.4f (perplexity %.3f)', workdir, loaded.step,
               objective.eval_name, bits, 2 ** bits)
  name = f'eval_step_{loaded.step}_seed{config.seed}_{config.train.eval_batches}batches.json'
  _write_json(os.path.join(workdir, name), record)
  return record


def sample_workdir(config, workdir: str) -> dict:
  """Writes samples of the checkpoint in `workdir` with the given `config.sampling`."""
  loaded = load(workdir)
  settings = config.sampling
  rng = jax.random.key(config.seed)
  start = time.time()
  tokens, nfe = loaded.sample_tokens(rng, settings.num_samples, settings.num_steps,
                                     settings.temperature, settings.sampler, settings.prompt,
                                     batch_size=settings.batch_size)
  seconds = time.time() - start
  texts = [loaded.tokenizer.decode(row) for row in tokens]
  directory = workdir_lib.samples_dir(workdir)
  os.makedirs(directory, exist_ok=True)
  stem = (f'sample_{settings.sampler}_{settings.num_steps}steps_T{settings.temperature:g}'
          f'_seed{config.seed}')
  if settings.prompt:
    # A short hash keeps outputs of different prompts apart without long names.
    stem += '_prompt' + hashlib.sha256(settings.prompt.encode('utf-8')).hexdigest()[:8]
  with open(os.path.join(directory, stem + '.txt'), 'w', encoding='utf-8') as f:
    for index, text in enumerate(texts):
      f.write(f'===== sample {index} =====\n{text}\n')
  with open(os.path.join(directory, stem + '.jsonl'), 'w', encoding='utf-8') as f:
    for index, (text, spent) in enumerate(zip(texts, nfe)):
      f.write(json.dumps({'index': index, 'nfe': int(spent), 'text': text,
                          'prompt': settings.prompt}) + '\n')
  logging.info('Wrote %d samples (%.2f s, mean NFE %.1f) to %s', len(texts), seconds,
               float(np.mean(nfe)), os.path.join(directory, stem + '.txt'))
  return {'texts': texts, 'nfe': nfe.tolist(), 'seconds': seconds,
          'path': os.path.join(directory, stem + '.txt')}
