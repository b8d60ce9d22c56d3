r"""Character-level autoregressive evaluator on the 21 Project Gutenberg books.

  MCD_DATA_DIR=../shared/data python -m mcd_jax.main \
      --config configs/gutenberg_char_ar.py --workdir /tmp/gutenberg_char_ar

Its 4,000 steps take an estimated 50 minutes alone on 2 CPU cores (1.25 to
1.37 steps per second measured there). Expected result: 1.833 validation bits
per character at step 4,000 (docs/results.md, section 4).
"""

from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.task = 'autoregressive'
  config.data.source = 'files'
  config.data.paths = 'gutenberg/*.txt'
  config.data.tokenizer = 'char'
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.model.d_model = 256
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_rate = 0.995
  config.train.num_steps = 4000
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.eval_batches = 32
  config.train.checkpoint_every = 250
  if config_base.parse_smoke_argument(arg):
    config_base.apply_smoke(config)
  return config
