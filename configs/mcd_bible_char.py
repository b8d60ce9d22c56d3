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
  config = config_base.mcd_job_config('configs/bible_char.py', 'configs/bible_char_ar.py',
                                      steps_per_round=100, smoke=smoke)
  config.train.log_every = 25
  config.pipeline.num_samples = 64
  if smoke:
    config_base.apply_smoke(config)
  return config
