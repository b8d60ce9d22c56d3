"""Times the trainer's jitted step: diffusion teacher step against MCD distillation step.

Both steps are built exactly as `train.train_and_evaluate` builds them
(`objectives.make_objective`, `train_state.create_state`, `train.make_train_step`
with the state donated), on random tokens. The MCD step runs one teacher
forward pass without gradient and the student forward and backward pass, so
its model FLOPs per token are train_flops_per_token + forward_flops_per_token
(about 4/3 of the teacher step's).

Model FLOP utilisation (MFU) = model FLOPs per second / the machine's matmul
peak, where the peak is the best rate of a jitted [n, n] float32 matmul timed
in the same interleaved repeats as the steps.

With --dtype-check-steps N it also trains a small diffusion model for N steps
on the 'markov' source in float32 and in bfloat16 and reports both validation
ELBOs (bits per token).
Examples:

  python benchmarks/trainer_speed.py --output /tmp/trainer_speed.json
  python benchmarks/trainer_speed.py --smoke   # tiny model, seconds
  python benchmarks/trainer_speed.py --smoke --dtype-check-steps 300
"""

import argparse
import os
import tempfile

import common  # Sets up the import path; keep before the mcd_jax imports.
import jax
import jax.numpy as jnp

from mcd_jax import config_base
from mcd_jax import experiment
from mcd_jax import objectives
from mcd_jax import schedules
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import train_state as train_state_lib
from mcd_jax.models import transformer


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vocab-size', type=int, default=80,
                      help='K (the Bible character vocabulary is about 80).')
  parser.add_argument('--seq-len', type=int, default=128, help='Tokens per sequence (L).')
  parser.add_argument('--batch-size', type=int, default=32, help='Sequences per step (B).')
  parser.add_argument('--d-model', type=int, default=256, help='Residual width.')
  parser.add_argument('--num-layers', type=int, default=4, help='Transformer blocks.')
  parser.add_argument('--num-heads', type=int, default=4, help='Attention heads.')
  parser.add_argument('--mlp-dim', type=int, default=1024, help='MLP hidden width.')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='Compute dtype of the model.')
  parser.add_argument('--matmul-size', type=int, default=2048,
                      help='n of the [n, n] float32 matmul that measures the peak.')
  parser.add_argument('--repeats', type=int, default=5,
                      help='Timed calls per function after one warm-up call.')
  parser.add_argument('--dtype-check-steps', type=int, default=0,
                      help='If > 0, train float32 and bfloat16 models this many steps '
                           'and report their validation ELBO.')
  parser.add_argument('--smoke', action='store_true',
                      help='Tiny model (d_model 32, L 32, B 4), a 256 matmul and 2 '
                           'repeats, for CI.')
  parser.add_argument('--output', default=None,
                      help='Path of the JSON results file. No file is written if unset.')
  args = parser.parse_args(argv)
  if args.smoke:
    args.d_model, args.num_layers, args.num_heads, args.mlp_dim = 32, 2, 2, 64
    args.seq_len, args.batch_size, args.matmul_size, args.repeats = 32, 4, 256, 2
  return args


def make_config(args, task: str):
  config = config_base.base_config()
  config.task = task
  config.data.seq_len = args.seq_len
  config.data.batch_size = args.batch_size
  config.model.d_model = args.d_model
  config.model.num_layers = args.num_layers
  config.model.num_heads = args.num_heads
  config.model.mlp_dim = args.mlp_dim
  config.model.dtype = args.dtype
  return config


def build_step(args, task: str, mesh):
  """Returns (stateful zero-argument step function, model) for 'diffusion' or 'distill'."""
  config = make_config(args, task)
  model = experiment.build_model(config, args.vocab_size)
  schedule = schedules.get_schedule(config.diffusion.schedule)
  objective = objectives.make_objective(config, model, schedule, args.vocab_size)
  tx = train_state_lib.make_optimizer(config.optim, config.train.num_steps)
  state, state_shardings = train_state_lib.create_state(
      model, tx, jax.random.key(0), mesh, config.mesh.axis_rules, args.seq_len)

  is_distill = task == 'distill'
  teacher_params = None
  if is_distill:
    teacher_params = jax.tree_util.tree_map(jnp.copy, state.params)
  step = train.make_train_step(
      objective, tx, config.optim.ema_rate, state_shardings, sharding.batch_sharding(mesh),
      state_shardings.params if is_distill else None, mesh)

  tokens = jax.device_put(
      jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len), 0,
                         args.vocab_size), sharding.batch_sharding(mesh))
  rng = jax.random.key(2)
  delta = jnp.float32(1.0 / 256)
  holder = {'state': state}

  def run_step():
    # The state is donated, so each call feeds the state the previous call returned.
    holder['state'], metrics = step(holder['state'], tokens, rng, teacher_params, delta)
    return metrics

  return run_step, model


def dtype_check(steps: int, smoke: bool) -> dict:
  """Trains the same small diffusion config in float32 and bfloat16; returns the ELBOs."""
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = config_base.base_config()
    config.data.source = 'markov'
    config.data.markov_num_chars = 200_000
    config.data.seq_len = 32
    config.data.batch_size = 16
    config.model.d_model = 32 if smoke else 64
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 64 if smoke else 256
    config.model.dtype = dtype
    config.optim.warmup_steps = min(50, steps // 4)
    config.train.num_steps = steps
    config.train.log_every = max(steps // 4, 1)
    config.train.eval_every = steps + 1
    config.train.eval_batches = 16
    config.train.checkpoint_every = steps
    config.sampling.num_samples = 2
    config.sampling.batch_size = 2
    config.sampling.num_steps = 8
    with tempfile.TemporaryDirectory() as workdir:
      summary = train.train_and_evaluate(config, os.path.join(workdir, dtype))
    results[dtype] = summary['val_elbo_bits_per_token']
  results['difference_bits'] = results['bfloat16'] - results['float32']
  results['steps'] = steps
  return results


def main(argv=None):
  args = parse_args(argv)
  mesh = sharding.create_mesh((-1, 1, 1))
  teacher_step, model = build_step(args, 'diffusion', mesh)
  distill_step, _ = build_step(args, 'distill', mesh)
  matmul, matmul_flops = common.matmul_function(args.matmul_size)

  seconds = common.time_interleaved(
      {'teacher_step': teacher_step, 'mcd_step': distill_step, 'matmul': matmul},
      args.repeats)
  peak = matmul_flops / min(seconds['matmul'])

  tokens_per_step = args.batch_size * args.seq_len
  train_flops = transformer.train_flops_per_token(model, args.seq_len)
  forward_flops = transformer.forward_flops_per_token(model, args.seq_len)
  flops_per_token = {'teacher_step': train_flops, 'mcd_step': train_flops + forward_flops}
  results = {}
  for name, per_token in flops_per_token.items():
    timing = common.summarize(seconds[name])
    achieved = per_token * tokens_per_step / timing['median_s']
    results[name] = dict(timing, tokens_per_second=tokens_per_step / timing['median_s'],
                         model_flops_per_token=per_token, model_flops_per_second=achieved,
                         mfu=achieved / peak)
  ratio = results['mcd_step']['median_s'] / results['teacher_step']['median_s']

  print(f'B={args.batch_size} L={args.seq_len} K={args.vocab_size} d_model={args.d_model} '
        f'layers={args.num_layers} dtype={args.dtype} repeats={args.repeats}; matmul peak '
        f'({args.matmul_size}^2 float32): {peak / 1e9:.1f} GFLOP/s')
  common.print_table(
      ['step', 'median s', 'tokens/s', 'GFLOP/s', 'MFU'],
      [[name, r['median_s'], r['tokens_per_second'], r['model_flops_per_second'] / 1e9,
        r['mfu']] for name, r in results.items()],
      [14, 12, 12, 12, 10])
  print(f'MCD step / teacher step (median): {ratio:.2f} (target <= 1.5)')

  report = {
      'batch_size': args.batch_size, 'seq_len': args.seq_len, 'vocab_size': args.vocab_size,
      'd_model': args.d_model, 'num_layers': args.num_layers, 'dtype': args.dtype,
      'repeats': args.repeats, 'matmul_size': args.matmul_size,
      'matmul': common.summarize(seconds['matmul']), 'matmul_peak_flops_per_second': peak,
      'results': results, 'ratio_mcd_over_teacher': ratio,
      'machine': common.machine_info(),
  }
  if args.dtype_check_steps:
    report['dtype_check'] = dtype_check(args.dtype_check_steps, args.smoke)
    check = report['dtype_check']
    print(f'Validation ELBO after {check["steps"]} steps: float32 {check["float32"]:.4f}, '
          f'bfloat16 {check["bfloat16"]:.4f} bits per token '
          f'(difference {check["difference_bits"]:+.4f})')
  common.write_json(args.output, report)
  return report


if __name__ == '__main__':
  main()
