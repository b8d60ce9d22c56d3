"""Default configuration and its validation.

Every config file in `configs/` starts from `base_config()` and changes fields;
`validate` then rejects keys that the defaults do not define (suggesting the
nearest one) and values of the wrong type, so a typo costs seconds, not a run.
"""

import difflib

import ml_collections


class ConfigError(ValueError):
  """An invalid configuration: the message names the key, the value and a fix."""


def base_config() -> ml_collections.ConfigDict:
  """Returns the defaults for every key that the code reads."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 'diffusion': masked diffusion teacher; 'autoregressive': causal evaluator
  # and baseline; 'distill': MCD or SDTT student from a teacher checkpoint.
  config.task = 'diffusion'

  config.data = ml_collections.ConfigDict()
  config.data.source = 'bible'  # 'bible' | 'files' | 'tfds' | 'markov'
  config.data.paths = ''  # Comma-separated paths or globs, relative to $MCD_DATA_DIR.
  config.data.tfds_name = ''
  config.data.tfds_split = 'train'
  # The 'markov' source: a random first-order chain with a known entropy rate.
  config.data.markov_num_symbols = 8
  config.data.markov_num_documents = 16
  config.data.markov_num_chars = 1_000_000
  config.data.tokenizer = 'char'  # 'char' | 'sentencepiece' | 'gpt2'
  config.data.vocab_size = 0  # SentencePiece only; other tokenizers set it.
  config.data.tokenizer_path = ''  # GPT-2: folder with vocab.json and merges.txt.
  config.data.seq_len = 128
  config.data.batch_size = 32  # Global batch, split over processes and devices.
  config.data.validation_fraction = 0.05
  config.data.seed = 0
  config.data.max_chars = 0  # 0 keeps the whole corpus.

  config.model = ml_collections.ConfigDict()
  config.model.d_model = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.model.dropout_rate = 0.0
  config.model.time_conditioning = False  # The MDLM default is time-agnostic.
  config.model.dtype = 'float32'  # Computation dtype: 'float32' | 'bfloat16'.
  config.model.remat = False
  config.model.scan_layers = False
  # '' lets JAX choose; 'cudnn' or 'xla' force an attention implementation.
  config.model.attention_implementation = ''
  # Embedding rows and head outputs are padded to a multiple of this, so the
  # vocabulary axis divides the tensor-parallel mesh axis.
  config.model.pad_vocab_multiple = 128
  # > 0 adds a learned absolute position embedding for that many positions.
  config.model.absolute_positions = 0

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = 'loglinear'  # 'linear' | 'cosine' | 'loglinear'

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.01
  config.optim.grad_clip = 1.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.ema_rate = 0.999

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.eval_batches = 8
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 3
  config.train.sample_every = 0  # 0 samples only at the end.

  config.sampling = ml_collections.ConfigDict()
  config.sampling.sampler = 'ancestral'  # 'ancestral' | 'deterministic'
  config.sampling.num_steps = 128
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.sampling.temperature = 1.0
  config.sampling.prompt = ''

  config.distill = ml_collections.ConfigDict()
  config.distill.method = 'mcd'  # 'mcd' | 'sdtt'
  config.distill.teacher_workdir = ''
  config.distill.base_steps = 1024  # N₀: the teacher's number of sampling steps.
  config.distill.num_rounds = 6
  config.distill.steps_per_round = 500
  config.distill.trajectory_source = 'data'  # 'data' | 'teacher'
  config.distill.divergence = 'reverse_kl'  # 'reverse_kl' | 'forward_kl'
  config.distill.log_prob_floor = -30.0

  # The main job (--mode pipeline): what to train when no workdir is given,
  # and what the quality-speed table measures.
  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.teacher_config = ''  # Config file (with ':smoke' if wanted).
  config.pipeline.evaluator_config = ''
  config.pipeline.evaluator_workdir = ''
  config.pipeline.students = ('mcd_data', 'mcd_teacher', 'sdtt')
  config.pipeline.step_divisors = (4, 16, 32)  # Students sample in N₀ / d steps.
  config.pipeline.num_samples = 64
  config.pipeline.batch_size = 32
  config.pipeline.temperature_low = 0.5  # Lower end of the temperature search.
  # Samples per temperature tried by the search: the first samples of every
  # row, so the control and its reference are compared on the same random
  # draws. The control row itself then uses pipeline.num_samples.
  config.pipeline.search_samples = 64

  # --mode evaluate on any trained workdirs: with `models` set, it measures
  # every (model, sampler, steps, temperature) as the pipeline's table does,
  # with the sample counts and evaluator of `pipeline`.
  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.models = ()  # 'NAME=WORKDIR' entries. Empty: the ELBO of --workdir.
  config.evaluate.samplers = ('ancestral',)
  config.evaluate.steps = (256, 64, 16)
  config.evaluate.temperatures = (1.0,)
  config.evaluate.control = ''  # 'MODEL=REFERENCE': MODEL tempered to REFERENCE's entropy.

  config.mesh = ml_collections.ConfigDict()
  # Axes (data, fsdp, tensor); -1 takes the remaining devices.
  config.mesh.shape = (-1, 1, 1)
  config.mesh.axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('vocab', 'tensor'),
      ('kv', None),
      ('length', None),
      ('layers', None),
      ('time', None),
  )
  return config


_CHOICES = {
    'task': ('diffusion', 'autoregressive', 'distill'),
    'data.source': ('bible', 'files', 'tfds', 'markov'),
    'data.tokenizer': ('char', 'sentencepiece', 'gpt2'),
    'model.dtype': ('float32', 'bfloat16'),
    'diffusion.schedule': ('linear', 'cosine', 'loglinear'),
    'sampling.sampler': ('ancestral', 'deterministic'),
    'distill.method': ('mcd', 'sdtt'),
    'distill.trajectory_source': ('data', 'teacher'),
    'distill.divergence': ('reverse_kl', 'forward_kl'),
}

_AT_LEAST_ONE = (
    'data.seq_len', 'data.batch_size', 'model.d_model', 'model.num_layers',
    'model.num_heads', 'model.mlp_dim', 'train.num_steps', 'train.log_every',
    'train.eval_every', 'train.checkpoint_every', 'train.eval_batches', 'train.keep_checkpoints', 'sampling.num_steps',
    'sampling.num_samples', 'sampling.batch_size', 'distill.base_steps',
    'distill.steps_per_round', 'pipeline.num_samples', 'pipeline.batch_size',
    'pipeline.search_samples')


def mcd_job_config(teacher_config: str, evaluator_config: str, steps_per_round: int,
                   smoke: bool) -> ml_collections.ConfigDict:
  """Returns the settings that the main MCD jobs share (configs/mcd_*.py).

  The students start from a teacher that samples in N₀ = 256 steps and, after
  4 rounds, sample in 16. `teacher_config` and `evaluator_config` are the
  config files that the pipeline trains when no workdir is given; with
  `smoke`, their smoke variants. The caller applies `apply_smoke` last.
  """
  config = base_config()
  config.task = 'distill'
  config.data.batch_size = 32
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 20
  config.optim.ema_rate = 0.99
  config.distill.method = 'mcd'
  config.distill.base_steps = 256
  config.distill.num_rounds = 4
  config.distill.steps_per_round = steps_per_round
  config.train.num_steps = config.distill.num_rounds * steps_per_round
  config.train.eval_every = config.train.num_steps
  config.train.eval_batches = 8
  config.train.checkpoint_every = 100
  config.sampling.num_steps = 16
  suffix = ':smoke' if smoke else ''
  config.pipeline.teacher_config = teacher_config + suffix
  config.pipeline.evaluator_config = evaluator_config + suffix
  config.pipeline.batch_size = 32
  return config


def _flatten(config, prefix=''):
  items = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      items.update(_flatten(value, name + '.'))
    else:
      items[name] = value
  return items


def flat_defaults() -> dict:
  """Maps the dotted name of every config key, e.g. 'train.num_steps', to its default."""
  return _flatten(base_config())


def flat_keys() -> set[str]:
  """Returns the dotted names of every config key."""
  return set(flat_defaults())


def unknown_key_message(name: str) -> str:
  """Formats the error for a key that `base_config` does not define, with the nearest key."""
  nearest = difflib.get_close_matches(name, sorted(flat_keys()), n=1)
  hint = f' Did you mean {nearest[0]!r}?' if nearest else ''
  return f'Unknown config key {name!r}.{hint}'


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown keys, wrong types and impossible values."""
  defaults = _flatten(base_config())
  values = _flatten(config)

  for name, value in values.items():
    if name not in defaults:
      raise ConfigError(unknown_key_message(name))
    expected = type(defaults[name])
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected is tuple and isinstance(value, list):
      continue
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
      raise ConfigError(
          f'Config key {name!r} must be of type {expected.__name__}, '
          f'got {value!r} of type {type(value).__name__}.')

  for name, choices in _CHOICES.items():
    if values[name] not in choices:
      raise ConfigError(
          f'Config key {name!r} is {values[name]!r}; choose one of {list(choices)}.')

  for name in _AT_LEAST_ONE:
    if values[name] < 1:
      raise ConfigError(f'Config key {name!r} must be at least 1, got {values[name]}.')

  if config.model.d_model % config.model.num_heads:
    raise ConfigError(
        f'model.d_model ({config.model.d_model}) must be divisible by '
        f'model.num_heads ({config.model.num_heads}).')
  if (config.model.d_model // config.model.num_heads) % 2:
    raise ConfigError(
        'The head dimension model.d_model / model.num_heads must be even for '
        f'rotary embeddings, got {config.model.d_model // config.model.num_heads}.')
  # (key, lowest, highest, whether the lowest is allowed) for float ranges.
  ranges = (
      ('optim.learning_rate', 0.0, float('inf'), False),
      ('optim.grad_clip', 0.0, float('inf'), False),
      ('optim.weight_decay', 0.0, float('inf'), True),
      ('optim.b1', 0.0, 1.0, True),
      ('optim.b2', 0.0, 1.0, True),
      ('optim.ema_rate', 0.0, 1.0, True),
      ('sampling.temperature', 0.0, float('inf'), False),
      ('model.dropout_rate', 0.0, 1.0, True),
  )
  for name, low, high, low_allowed in ranges:
    value = values[name]
    above_low = value >= low if low_allowed else value > low
    if not (above_low and value < high):
      bound = '>=' if low_allowed else '>'
      upper = f' and < {high}' if high != float('inf') else ''
      raise ConfigError(f'Config key {name!r} must be {bound} {low}{upper}, got {value}.')
  if not 0.0 < config.pipeline.temperature_low <= 1.0:
    raise ConfigError("Config key 'pipeline.temperature_low' must be > 0 and <= 1, got "
                      f'{config.pipeline.temperature_low}.')
  for name in ('optim.warmup_steps', 'train.sample_every'):
    if values[name] < 0:
      raise ConfigError(f'Config key {name!r} must be at least 0, got {values[name]}.')

  for steps in config.evaluate.steps:
    if not isinstance(steps, int) or steps < 1:
      raise ConfigError(f'evaluate.steps must contain integers >= 1, got {steps!r}.')
  for temperature in config.evaluate.temperatures:
    if not isinstance(temperature, (int, float)) or temperature <= 0:
      raise ConfigError(
          f'evaluate.temperatures must contain numbers > 0, got {temperature!r}.')

  if not 0.0 < config.data.validation_fraction < 1.0:
    raise ConfigError(
        'data.validation_fraction must lie strictly between 0 and 1, got '
        f'{config.data.validation_fraction}.')
  if len(tuple(config.mesh.shape)) != 3:
    raise ConfigError(
        f'mesh.shape must have 3 entries (data, fsdp, tensor), got {config.mesh.shape}.')
  if config.task == 'distill':
    total = config.distill.num_rounds * config.distill.steps_per_round
    if config.train.num_steps != total:
      raise ConfigError(
          f'train.num_steps ({config.train.num_steps}) must equal distill.num_rounds x '
          f'distill.steps_per_round ({total}) for task "distill".')
    steps = config.distill.base_steps
    if steps % (2 ** config.distill.num_rounds):
      raise ConfigError(
          f'distill.base_steps ({steps}) must be divisible by 2**distill.num_rounds '
          f'({2 ** config.distill.num_rounds}) so every round halves the step count.')


def parse_smoke_argument(arg: str | None) -> bool:
  """Returns True for the `smoke` config argument; raises for anything else."""
  if arg in (None, ''):
    return False
  if arg == 'smoke':
    return True
  raise ConfigError(f'Unknown config argument {arg!r}; the only variant is "smoke".')


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `config` to train in under a minute on one CPU core (the `smoke` variant)."""
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.max_chars = 200_000
  if config.data.tokenizer == 'sentencepiece':
    config.data.vocab_size = min(config.data.vocab_size, 512)
  config.model.d_model = 64
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 128
  config.optim.warmup_steps = 5
  config.train.num_steps = 40
  config.train.log_every = 10
  config.train.eval_every = 40
  config.train.eval_batches = 2
  config.train.checkpoint_every = 20
  config.sampling.num_steps = 16
  config.sampling.num_samples = 4
  config.sampling.batch_size = 4
  config.distill.base_steps = 16
  config.distill.num_rounds = 2
  config.distill.steps_per_round = 10
  config.pipeline.num_samples = 8
  config.pipeline.search_samples = 8
  config.pipeline.batch_size = 8
  config.pipeline.step_divisors = (4,)
  if config.task == 'distill':
    config.train.num_steps = config.distill.num_rounds * config.distill.steps_per_round
  return config
