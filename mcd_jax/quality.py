"""Quality-speed rows: sample, time, score under the AR evaluator, tune the control.

`--mode pipeline` measures the teacher, students and controls it trained with
these functions. `--mode evaluate` with `evaluate.models` set measures any list
of workdirs:

  python -m mcd_jax.main --config configs/mcd_bible_char.py --workdir /tmp/table \
      --mode evaluate --config.pipeline.evaluator_workdir=DEMO/evaluator \
      --config.evaluate.models="('teacher=DEMO/teacher', 'mcd=DEMO/students/mcd_data')" \
      --config.evaluate.steps="(64, 16)" --config.evaluate.control=teacher=mcd

Every row shares one PRNG key, so rows that differ only in the model or the
temperature use the same random numbers (paired comparisons).
"""

import json
import os

from absl import logging
import jax
import numpy as np

from mcd_jax import config_base
from mcd_jax import evaluation
from mcd_jax import inference
from mcd_jax import metrics as metrics_lib
from mcd_jax import sampling
from mcd_jax import workdir as workdir_lib

CONTROL_SUFFIX = ' (temperature-matched)'


class Measurer:
  """Measures rows for loaded models with the sample counts of `config.pipeline`."""

  def __init__(self, config, evaluator: inference.LoadedModel):
    self.settings = config.pipeline
    self.evaluator = evaluator
    self.rng = jax.random.key(config.seed)

  def _sample_fn(self, loaded, sampler: str, num_steps: int, temperature: float):
    """Builds `sample_fn(key, batch_size)` for one model, sampler and temperature."""
    bound = sampling.make_sample_fn(
        loaded.model, sampler=sampler, seq_len=loaded.config.data.seq_len,
        num_steps=num_steps, schedule=loaded.schedule, mask_id=loaded.vocab_size,
        temperature=temperature, time_conditioned=loaded.config.model.time_conditioning)
    return lambda key, batch_size: bound(loaded.params, key, batch_size=batch_size)

  def row(self, name: str, loaded, num_steps: int, temperature: float = 1.0,
          sampler: str = 'ancestral') -> dict:
    """Samples `pipeline.num_samples` texts and returns their table row."""
    sample_fn = self._sample_fn(loaded, sampler, num_steps, temperature)

    tokens, nfe, seconds = evaluation.timed_sampling(
        sample_fn, self.rng, self.settings.num_samples, self.settings.batch_size)
    quality = evaluation.measure_quality(self.evaluator.model, self.evaluator.params,
                                         tokens, loaded.vocab_size)

    row = {'model': name, 'sampler': sampler, 'steps': num_steps,
           'temperature': round(float(temperature), 4), 'nfe': float(np.mean(nfe)),
           'seconds_per_sample': seconds}
    row.update(quality.__dict__)
    logging.info('%s', json.dumps(row))
    return row

  def entropy(self, loaded, num_steps: int, temperature: float,
              sampler: str = 'ancestral') -> float:
    """Returns the mean unigram entropy of `pipeline.search_samples` samples (no timing)."""
    sample_fn = self._sample_fn(loaded, sampler, num_steps, temperature)
    batch_size, count = self.settings.batch_size, self.settings.search_samples

    tokens = [np.asarray(sample_fn(jax.random.fold_in(self.rng, index), batch_size).tokens)
              for index in range(-(-count // batch_size))]
    entropy = float(evaluation.unigram_entropy(np.concatenate(tokens)[:count],
                                               loaded.vocab_size).mean())

    logging.info('Temperature search, %s sampler at %d steps: T=%.4f gives entropy %.4f.',
                 sampler, num_steps, temperature, entropy)
    return entropy

  def matched_row(self, name: str, loaded, num_steps: int, reference: str, reference_model,
                  sampler: str = 'ancestral') -> dict:
    """Returns the row of `loaded` at the temperature where its entropy meets `reference`'s.

    The control of the quality-speed table: a model that is only sharpened
    reaches a lower Gen PPL too, so a student must also beat its teacher at
    the student's entropy. The search compares both models on the same
    `pipeline.search_samples` random draws (the first samples of every row),
    so the comparison is paired.
    """
    target_entropy = self.entropy(reference_model, num_steps, 1.0, sampler)
    low = self.settings.temperature_low
    temperature = evaluation.match_temperature(
        lambda t: self.entropy(loaded, num_steps, t, sampler), target_entropy, low=low)

    # The search returns an end of [low, 1] only when no T inside reaches the target.
    matched = temperature not in (low, 1.0)
    if not matched:
      logging.warning(
          'The entropy %.4f of %s at %d steps is out of reach of %s for T in [%g, 1]; '
          'its control row uses T=%g and is not matched. Lower pipeline.temperature_low '
          'if the target lies below.', target_entropy, reference, num_steps, name, low,
          temperature)
    row = self.row(name + CONTROL_SUFFIX, loaded, num_steps, temperature, sampler)
    row.update(reference=reference, target_entropy=target_entropy, matched=matched,
               search_samples=self.settings.search_samples)
    return row


def format_table(rows: list[dict]) -> str:
  """Formats rows as a Markdown table."""
  lines = ['| model | sampler | steps | T | NFE | Gen PPL (95% interval) | entropy (nats) | '
           's / sample |', '|---|---|---:|---:|---:|---|---:|---:|']
  for row in rows:
    lines.append(
        f"| {row['model']} | {row.get('sampler', 'ancestral')} | {row['steps']} | "
        f"{row['temperature']:.3g} | {row['nfe']:.1f} | "
        f"{row['gen_ppl']:.2f} ({row['gen_ppl_low']:.2f}–{row['gen_ppl_high']:.2f}) | "
        f"{row['entropy']:.3f} | {row['seconds_per_sample']:.4f} |")
  return '\n'.join(lines) + '\n'


def write_results(directory: str, rows: list[dict], summary: dict, title: str) -> None:
  """Writes table.json (`summary` plus the rows), table.md and gen_ppl_vs_nfe.png."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'table.json'), 'w', encoding='utf-8') as f:
    json.dump({**summary, 'rows': rows}, f, indent=2)
  with open(os.path.join(directory, 'table.md'), 'w', encoding='utf-8') as f:
    f.write(format_table(rows))
  evaluation.plot_gen_ppl_vs_nfe(rows, os.path.join(directory, 'gen_ppl_vs_nfe.png'), title)
  logging.info('Quality-speed table (%s):\n%s', directory, format_table(rows))


def parse_models(entries) -> dict[str, str]:
  """Maps 'NAME=WORKDIR' entries of `evaluate.models` to {name: workdir}."""
  models = {}
  for entry in entries:
    name, separator, path = str(entry).partition('=')
    if not (separator and name.strip() and path.strip()):
      raise config_base.ConfigError(
          f'evaluate.models entry {entry!r} is invalid; write NAME=WORKDIR, for example '
          "--config.evaluate.models=\"('teacher=/tmp/teacher', 'mcd=/tmp/student')\".")
    if name.strip() in models:
      raise config_base.ConfigError(
          f'evaluate.models contains the name {name.strip()!r} twice; give each model its '
          'own name.')
    models[name.strip()] = path.strip()
  return models


def _parse_control(control: str, models: dict[str, str]) -> tuple[str, str] | None:
  if not control:
    return None
  controlled, separator, reference = (part.strip() for part in control.partition('='))
  if not separator or controlled not in models or reference not in models:
    raise config_base.ConfigError(
        f'evaluate.control={control!r} is invalid; write MODEL=REFERENCE with two names '
        f'from evaluate.models ({", ".join(models)}), for example teacher=mcd.')
  return controlled, reference


def ignored_evaluate_keys(config) -> list[str]:
  """Lists the `evaluate.*` keys set away from their defaults while `models` is empty."""
  if config.evaluate.models:
    return []
  defaults = config_base.base_config().evaluate
  as_tuple = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value
  return [f'evaluate.{key}' for key, value in config.evaluate.items()
          if as_tuple(value) != as_tuple(defaults[key])]


def check_workdir_task(path: str, setting: str, tasks: tuple[str, ...]) -> None:
  """Raises unless the workdir `path` (from config key `setting`) trained one of `tasks`."""
  task = workdir_lib.load_config(path).task
  if task not in tasks:
    raise config_base.ConfigError(
        f'{setting} points at {path}, a {task!r} model, but it must be '
        f'{" or ".join(repr(t) for t in tasks)}. Check that the paths are not swapped.')


def check_compatible(evaluator, models: dict) -> None:
  """Raises unless every model writes tokens that the evaluator reads the same way."""
  for name, loaded in models.items():
    if loaded.tokenizer.fingerprint() != evaluator.tokenizer.fingerprint():
      raise config_base.ConfigError(
          f'{name} and the evaluator use different tokenizers (vocabularies of '
          f'{loaded.vocab_size} and {evaluator.vocab_size} tokens), so Gen PPL would be '
          'meaningless. Use an evaluator trained on the same corpus and tokenizer.')
    if loaded.config.data.seq_len != evaluator.config.data.seq_len:
      raise config_base.ConfigError(
          f'{name} writes sequences of {loaded.config.data.seq_len} tokens but the '
          f'evaluator was trained on {evaluator.config.data.seq_len}. Use an evaluator '
          'with the same data.seq_len.')


def describe(loaded_models: dict) -> dict:
  """Returns {name: {'workdir': absolute path, 'step': checkpoint step}} for table.json."""
  return {name: {'workdir': os.path.abspath(path), 'step': loaded.step}
          for name, (path, loaded) in loaded_models.items()}


def _check_settings(config) -> tuple[dict[str, str], tuple[str, str] | None]:
  settings = config.evaluate
  models = parse_models(settings.models)
  control = _parse_control(settings.control, models)
  if not config.pipeline.evaluator_workdir:
    raise config_base.ConfigError(
        'evaluate.models needs an autoregressive evaluator for Gen PPL: set '
        'pipeline.evaluator_workdir to its workdir.')
  for key in ('samplers', 'steps', 'temperatures'):
    if not settings[key]:
      raise config_base.ConfigError(f'evaluate.{key} is empty; give at least one value.')
  for sampler in settings.samplers:
    if sampler not in sampling.SAMPLERS:
      raise config_base.ConfigError(
          f'evaluate.samplers contains {sampler!r}; choose from {sorted(sampling.SAMPLERS)}.')
  if control and 1.0 not in settings.temperatures:
    raise config_base.ConfigError(
        'evaluate.control matches entropies at T = 1, so evaluate.temperatures must '
        f'contain 1.0 (it is {tuple(settings.temperatures)}).')

  check_workdir_task(config.pipeline.evaluator_workdir, 'pipeline.evaluator_workdir',
                     ('autoregressive',))
  for name, path in models.items():
    check_workdir_task(path, f'evaluate.models entry {name!r}', ('diffusion', 'distill'))
  return models, control


def evaluate_models(config, workdir: str) -> list[dict]:
  """Measures every (model, sampler, steps, temperature) of `config.evaluate`.

  Writes table.json, table.md and the plot to `workdir`/results. With
  `evaluate.control` = 'MODEL=REFERENCE', each (sampler, steps) also gets
  MODEL at the temperature where its entropy meets REFERENCE's at T = 1.
  """
  models, control = _check_settings(config)
  settings = config.evaluate
  results = os.path.join(workdir, 'results')
  if os.path.exists(os.path.join(results, 'table.json')):
    logging.warning('%s already contains a table; this run replaces it.', results)

  evaluator = inference.load(config.pipeline.evaluator_workdir)
  loaded = {name: inference.load(path) for name, path in models.items()}
  check_compatible(evaluator, loaded)
  measurer = Measurer(config, evaluator)
  planned = len(settings.samplers) * len(settings.steps) * (
      len(models) * len(settings.temperatures) + (1 if control else 0))
  progress = metrics_lib.Progress(planned, 0, 'evaluation', log_every=1)

  rows = []
  for sampler in settings.samplers:
    for steps in settings.steps:
      for name, model in loaded.items():
        for temperature in settings.temperatures:
          rows.append(measurer.row(name, model, steps, temperature, sampler))
          progress.update(len(rows), {'gen_ppl': rows[-1]['gen_ppl']})
      if control:
        controlled, reference = control
        rows.append(measurer.matched_row(controlled, loaded[controlled], steps, reference,
                                         loaded[reference], sampler))
        progress.update(len(rows), {'gen_ppl': rows[-1]['gen_ppl']})
  progress.close()

  summary = {
      'models': describe({name: (models[name], loaded[name]) for name in models}),
      'evaluator': describe({'evaluator': (config.pipeline.evaluator_workdir,
                                           evaluator)})['evaluator'],
      'evaluate': config.evaluate.to_dict(), 'pipeline': config.pipeline.to_dict(),
      'seed': config.seed}
  write_results(results, rows, summary, 'Gen PPL against NFE')
  return rows


def evaluate(config, workdir: str) -> dict | list[dict]:
  """Runs `--mode evaluate`: the table of `evaluate.models`, else the ELBO of `workdir`."""
  if config.evaluate.models:
    return evaluate_models(config, workdir)
  ignored = ignored_evaluate_keys(config)
  if ignored:
    verb = 'is' if len(ignored) == 1 else 'are'
    raise config_base.ConfigError(
        f'{", ".join(ignored)} {verb} used only with evaluate.models. Set evaluate.models to '
        'the NAME=WORKDIR entries to measure, or drop those keys to get the validation ELBO.')
  return inference.evaluate_workdir(config, workdir)
