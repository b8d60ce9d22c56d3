r"""CPU-scale reference teacher: character level on 21 Project Gutenberg books.

The books are read from $MCD_DATA_DIR/gutenberg (the data is not shipped with
mcd_jax; point MCD_DATA_DIR at a folder holding gutenberg/*.txt):

  MCD_DATA_DIR=../shared/data python -m mcd_jax.main \
      --config configs/gutenberg_char.py --workdir /tmp/gutenberg_char

Its 6,000 steps take an estimated 80 to 90 minutes alone on 2 CPU cores (1.1
to 1.3 steps per second measured there). It resumes from its workdir, so it
can run in several sittings. Expected result: validation ELBO 2.518 bits per
character at step 6,000 (docs/results.md, section 4).
"""

from mcd_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.task = 'diffusion'
  config.data.source = 'files'
  config.data.paths = 'gutenberg/*.txt'
  config.data.tokenizer = 'char'
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.data.validation_fraction = 0.05
  config.model.d_model = 256
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_rate = 0.995
  config.train.num_steps = 6000
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.eval_batches = 32
  config.train.checkpoint_every = 250
  config.sampling.num_steps = 256
  if config_base.parse_smoke_argument(arg):
    config_base.apply_smoke(config)
  return config
