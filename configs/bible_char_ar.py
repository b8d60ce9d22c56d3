r"""Character-level autoregressive evaluator on the King James Bible.

It scores samples (Gen PPL) for the demo's quality-speed table and is the
autoregressive baseline of the same size:

  python -m mcd_jax.main --config configs/bible_char_ar.py --workdir /tmp/bible_char_ar

Expected result: see docs/results.md for the validation bits per character.
"""

from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.task = 'autoregressive'
  config.data.source = 'bible'
  config.data.tokenizer = 'char'
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.model.d_model = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.optim.learning_rate = 1e-3
  config.optim.ema_rate = 0.99
  config.train.num_steps = 800
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.eval_batches = 16
  config.train.checkpoint_every = 250
  if config_base.parse_smoke_argument(arg):
    config_base.apply_smoke(config)
  return config
