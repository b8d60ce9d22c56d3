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

Without those two flags the pipeline also trains the teacher (before the
students) and the evaluator (after them), an estimated 2.3 hours more alone on
2 CPU cores. The three students take 4 rounds of 200 steps each, and
every row of the table rests on 256 samples. Expected result (2-core CPU:
students 15 to 17 min each, table about 45 min): the teacher at 256 steps
reaches Gen PPL 13.09, and the MCD (data) student at 16 steps 16.62, against
17.72 for the undistilled teacher and 16.09 for the temperature-matched one.
docs/results.md, section 4, has the whole table.
"""

from mcd_jax import config_base


def get_config(arg=None):
  smoke = config_base.parse_smoke_argument(arg)
  config = config_base.mcd_job_config('configs/gutenberg_char.py', 'configs/gutenberg_char_ar.py',
                                      steps_per_round=200, smoke=smoke)
  config.train.log_every = 50
  config.pipeline.num_samples = 256
  # The temperature search uses every sample of the rows it compares.
  config.pipeline.search_samples = 256
  if smoke:
    config_base.apply_smoke(config)
  return config
