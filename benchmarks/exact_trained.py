r"""Exact sampler quality of trained teacher and students on a tiny known source.

The source is a known distribution over all V^L sequences (default L = 6,
V = 4: 4,096 sequences, 15,625 partially masked states). A teacher and its
students are the real Transformer trained with the real jitted train step
(`train.make_train_step` with the trainer's objectives), on sequences drawn
from the source. Each trained model is evaluated on every partially masked
state, and dynamic programming over those states gives its N-step ancestral
sampler's exact output distribution: no sampling error in the table.

Reported for N in 16, 8, 4, 2, 1: KL(sampler ‖ source) in nats and the
sampler's entropy, for the teacher, the MCD students (data and teacher
trajectories), the SDTT student, and the teacher with its temperature tuned to
the MCD student's entropy. Run from the repository root:

  PYTHONPATH=. python benchmarks/exact_trained.py --output exact_trained.json
  PYTHONPATH=. python benchmarks/exact_trained.py --smoke     # seconds, for CI
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcd_jax import config_base
from mcd_jax import exact
from mcd_jax import objectives
from mcd_jax import schedules
from mcd_jax import sharding
from mcd_jax import train
from mcd_jax import train_state as train_state_lib
from mcd_jax.distill import rounds
from mcd_jax.models import transformer


def model_config(args) -> ml_collections.ConfigDict:
  config = config_base.base_config()
  config.model.d_model = args.d_model
  config.model.num_layers = args.num_layers
  config.model.num_heads = 4
  config.model.mlp_dim = 4 * args.d_model
  config.model.pad_vocab_multiple = 1
  # The tiny sources' marginals depend on the absolute position, which rotary
  # embeddings alone cannot see.
  config.model.absolute_positions = args.seq_len
  return config


def sample_batches(source, seq_len, vocab_size, batch_size, rng):
  """Yields int32[B, L] sequences drawn from the source distribution."""
  sequences = exact.all_sequences(seq_len, vocab_size)
  cumulative = np.cumsum(source)
  while True:
    indices = np.searchsorted(cumulative, rng.random(batch_size) * cumulative[-1])
    yield sequences[np.minimum(indices, len(sequences) - 1)].astype(np.int32)


def train_model(config, model, objective, batches, num_steps, learning_rate, seed,
                mesh, start_params=None, round_schedule=None, snapshot_rounds=False):
  """Runs the trainer's jitted step; returns the EMA parameters (and round snapshots)."""
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.learning_rate = learning_rate
  optim.warmup_steps = min(50, num_steps // 10)
  tx = train_state_lib.make_optimizer(optim, num_steps)
  rules = config.mesh.axis_rules
  state, shardings = train_state_lib.create_state(model, tx, jax.random.key(seed), mesh,
                                                  rules, config.data.seq_len)
  teacher_shardings = None
  teacher_params = None
  if start_params is not None:
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    state = state.replace(params=copy(start_params), ema_params=copy(start_params))
    teacher_params = copy(start_params)
    teacher_shardings = shardings.params
  step_fn = train.make_train_step(objective, tx, 0.99, shardings, sharding.batch_sharding(mesh),
                                  teacher_shardings, mesh)
  rng = jax.random.key(seed + 1)
  snapshots = {}
  for step in range(num_steps):
    delta = 0.0
    if round_schedule is not None:
      round_index, step_in_round = round_schedule.round_for_step(step)
      if step_in_round == 0 and step > 0:
        if snapshot_rounds:
          snapshots[round_index - 1] = jax.device_get(state.ema_params)
        teacher_params = jax.tree_util.tree_map(jnp.copy, state.params)
      delta = round_schedule.delta(round_index)
    state, _ = step_fn(state, jnp.asarray(next(batches)), rng, teacher_params,
                       jnp.float32(delta))
  if round_schedule is not None and snapshot_rounds:
    snapshots[round_schedule.num_rounds - 1] = jax.device_get(state.ema_params)
  return jax.device_get(state.ema_params), snapshots


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', choices=('mixture', 'markov'), default='mixture')
  parser.add_argument('--seq_len', type=int, default=6, help='sequence length L')
  parser.add_argument('--vocab_size', type=int, default=4, help='number of symbols V')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--num_layers', type=int, default=2)
  parser.add_argument('--teacher_steps', type=int, default=3000)
  parser.add_argument('--steps_per_round', type=int, default=400)
  parser.add_argument('--base_steps', type=int, default=16, help='N₀ of the teacher')
  parser.add_argument('--num_rounds', type=int, default=4)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--smoke', action='store_true', help='a few steps, for CI')
  parser.add_argument('--output', default='', help='JSON file for the results')
  args = parser.parse_args(argv)
  if args.smoke:
    args.seq_len, args.vocab_size = 4, 3
    args.d_model, args.num_layers = 32, 1
    args.teacher_steps, args.steps_per_round, args.num_rounds = 30, 10, 2
    args.base_steps, args.batch_size = 4, 32

  start = time.time()
  seq_len, vocab_size = args.seq_len, args.vocab_size
  make_source = exact.mixture_source if args.source == 'mixture' else exact.markov_source
  source = make_source(seq_len, vocab_size, args.seed)
  schedule = schedules.get_schedule('linear')
  config = model_config(args)
  config.data.seq_len = seq_len
  config.diffusion.schedule = 'linear'
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  model = transformer.from_config(config.model, vocab_size=vocab_size + 1,
                                  output_size=vocab_size, causal=False)
  batches = sample_batches(source, seq_len, vocab_size, args.batch_size,
                           np.random.default_rng(args.seed))

  # ---- Teacher ----
  teacher_objective = objectives.diffusion_objective(model, schedule, vocab_size)
  teacher_params, _ = train_model(config, model, teacher_objective, batches,
                                  args.teacher_steps, 1e-3, args.seed, mesh)
  teacher_table = exact.model_denoiser_table(model, teacher_params, seq_len, vocab_size)

  # ---- Students ----
  round_schedule = rounds.RoundSchedule(args.base_steps, args.num_rounds, args.steps_per_round)
  students = {}
  variants = {'mcd_data': ('mcd', 'data', 'reverse_kl'),
              'mcd_teacher': ('mcd', 'teacher', 'reverse_kl'),
              'sdtt': ('sdtt', 'data', 'reverse_kl')}
  for name, (method, trajectory_source, divergence) in variants.items():
    distill = ml_collections.ConfigDict(config.distill.to_dict())
    distill.method, distill.trajectory_source, distill.divergence = (
        method, trajectory_source, divergence)
    objective = objectives.distill_objective(model, schedule, vocab_size, vocab_size, distill)
    params, _ = train_model(config, model, objective, batches, round_schedule.total_steps,
                            3e-4, args.seed, mesh, start_params=teacher_params,
                            round_schedule=round_schedule)
    students[name] = exact.model_denoiser_table(model, params, seq_len, vocab_size)

  # ---- Exact sampler distributions ----
  step_counts = [args.base_steps // 2 ** k for k in range(5) if args.base_steps // 2 ** k >= 1]
  rows = []
  for num_steps in step_counts:
    teacher_q = exact.sampler_distribution(teacher_table, num_steps, schedule, seq_len,
                                           vocab_size)
    row = {'steps': num_steps, 'teacher_kl': exact.kl_divergence(teacher_q, source),
           'teacher_entropy': exact.entropy(teacher_q)}
    for name, table in students.items():
      q = exact.sampler_distribution(table, num_steps, schedule, seq_len, vocab_size)
      row[f'{name}_kl'] = exact.kl_divergence(q, source)
      row[f'{name}_entropy'] = exact.entropy(q)
    temperature, tempered_q = exact.entropy_matched_sampler(
        teacher_table, row['mcd_data_entropy'], num_steps, schedule, seq_len, vocab_size,
        xtol=1e-4)
    row['tempered_teacher_kl'] = exact.kl_divergence(tempered_q, source)
    row['tempered_teacher_temperature'] = temperature
    rows.append(row)

  result = {'source': args.source, 'seq_len': seq_len, 'vocab_size': vocab_size,
            'seed': args.seed, 'source_entropy': exact.entropy(source),
            'teacher_steps': args.teacher_steps, 'steps_per_round': args.steps_per_round,
            'num_rounds': args.num_rounds, 'base_steps': args.base_steps,
            'seconds': time.time() - start, 'rows': rows}
  print(f'{args.source} source, L={seq_len}, V={vocab_size}, seed={args.seed}, '
        f'entropy {result["source_entropy"]:.4f} nats; teacher N0={args.base_steps}, '
        f'{args.num_rounds} rounds of {args.steps_per_round} steps')
  print('   N  teacher KL (H)     MCD data KL (H)   MCD teacher KL (H)  SDTT KL (H)   '
        'tempered teacher KL (T)')
  for row in rows:
    print(f"  {row['steps']:2d}  {row['teacher_kl']:.4f} ({row['teacher_entropy']:.3f})  "
          f"{row['mcd_data_kl']:.4f} ({row['mcd_data_entropy']:.3f})  "
          f"{row['mcd_teacher_kl']:.4f} ({row['mcd_teacher_entropy']:.3f})  "
          f"{row['sdtt_kl']:.4f} ({row['sdtt_entropy']:.3f})  "
          f"{row['tempered_teacher_kl']:.4f} ({row['tempered_teacher_temperature']:.3f})")
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
