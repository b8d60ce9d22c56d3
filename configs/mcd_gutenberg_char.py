r"""The CPU-scale MCD experiment on the 21 Gutenberg books at character level.

Distills the teacher of configs/gutenberg_char.py into MCD students (data and
teacher trajectories) and the SDTT baseline, then measures every student and
control at N₀/4, N₀/16 and N₀/32 steps against the teacher at N₀ = 256, with
Gen PPL under the evaluator of configs/gutenberg_char_ar.py. Reuse finished
teacher and evaluator runs:

  MCD_DATA_DIR=../shared/data python -m mcd_jax.main \
      --config configs/mcd_gutenberg_char.py --workdir workdirs/mcd_gutenberg --mode pipeline \
      --config.distill.teacher_workdir=workdirs/gutenberg_char \
      --config.pipeline.evaluator_workdir=workdirs/gutenberg_char_ar

Without those two flags the pipeline trains both first (an estimated 2.5 hours
alone on 2 CPU cores). The three students take 4 rounds of 200 steps each, and
every row of the table rests on 256 samples. Expected result: see
docs/results.md, section 4.
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
  config.distill.steps_per_round = 200
  config.train.num_steps = config.distill.num_rounds * config.distill.steps_per_round
  config.train.log_every = 50
  config.train.eval_every = 800
  config.train.eval_batches = 8
  config.train.checkpoint_every = 100
  config.sampling.num_steps = 16
  config.pipeline.teacher_config = 'configs/gutenberg_char.py' + (':smoke' if smoke else '')
  config.pipeline.evaluator_config = 'configs/gutenberg_char_ar.py' + (':smoke' if smoke else '')
  config.pipeline.num_samples = 256
  config.pipeline.search_samples = 64
  config.pipeline.batch_size = 32
  if smoke:
    config_base.apply_smoke(config)
  return config
