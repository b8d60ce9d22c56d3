r"""The main MCD job on the King James Bible at character level (`make demo`).

Trains the teacher (configs/bible_char.py) and the autoregressive evaluator
(configs/bible_char_ar.py) unless their workdirs are given, distills the MCD
students (data and teacher trajectories) and the SDTT baseline, then measures
Gen PPL, entropy, NFE and wall-clock for all of them and for the controls:

  python -m mcd_jax.main --config configs/mcd_bible_char.py --workdir /tmp/mcd_bible \
      --mode pipeline

Distill only, from an existing teacher:

  python -m mcd_jax.main --config configs/mcd_bible_char.py --workdir /tmp/student \
      --config.distill.teacher_workdir=/tmp/mcd_bible/teacher

The teacher samples in N₀ = 256 steps; after 4 rounds the student samples in 16.
Expected result: see docs/results.md for the table this config produced.
"""

from mcd_jax import config_base


def get_config(arg=None):
  smoke = config_base.parse_smoke_argument(arg)
  config = config_base.base_config()
  config.task = 'distill'
  config.data.batch_size = 32
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 20
  config.optim.ema_rate = 0.99
  config.distill.method = 'mcd'
  config.distill.base_steps = 256
  config.distill.num_rounds = 4
  config.distill.steps_per_round = 100
  config.train.num_steps = config.distill.num_rounds * config.distill.steps_per_round
  config.train.log_every = 25
  config.train.eval_every = 400
  config.train.eval_batches = 8
  config.train.checkpoint_every = 100
  config.sampling.num_steps = 16
  config.pipeline.teacher_config = 'configs/bible_char.py' + (':smoke' if smoke else '')
  config.pipeline.evaluator_config = 'configs/bible_char_ar.py' + (':smoke' if smoke else '')
  config.pipeline.num_samples = 64
  config.pipeline.batch_size = 32
  if smoke:
    config_base.apply_smoke(config)
  return config
