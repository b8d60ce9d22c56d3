"""Times the reduced trajectory builder against the full Gaussian latent.

Both paths produce a coupled pair (z_t, z_s) for a batch of token sequences:

  reduced: masking times τ = α^{-1}(A_K(g)) from one gap g per position,
           then z_t, z_s by comparing t and s with τ. Cost O(B·L).
  full:    draw ε of shape [B, L, K], build w = γ e_x + ε at γ_t and γ_s and
           project both. Cost O(B·L·K).

Each path is jitted, run once to compile, then timed over several repeats.
Example:

  python benchmarks/duality_cost.py --output /tmp/duality_cost.json
  python benchmarks/duality_cost.py --smoke   # vocabulary of 1,000, seconds
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from mcd_jax import duality
from mcd_jax import schedules


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-size', type=int, default=8,
                      help='Sequences per batch (B).')
  parser.add_argument('--length', type=int, default=256,
                      help='Tokens per sequence (L).')
  parser.add_argument('--vocab-size', type=int, default=50257,
                      help='Vocabulary size K (GPT-2 has 50,257).')
  parser.add_argument('--schedule', default='linear',
                      choices=sorted(schedules.SCHEDULES),
                      help='Masking schedule α_t.')
  parser.add_argument('--repeats', type=int, default=10,
                      help='Timed calls per path after one warm-up call.')
  parser.add_argument('--smoke', action='store_true',
                      help='Use a vocabulary of 1,000 and 3 repeats, for CI.')
  parser.add_argument('--output', default=None,
                      help='Path of the JSON results file. No file is written if unset.')
  return parser.parse_args()


def build_paths(schedule, vocab_size):
  """Returns the jitted reduced and full builders of (z_t, z_s)."""
  mask_id = vocab_size

  @jax.jit
  def reduced(rng, tokens, t, s):
    times = duality.masking_times(rng, tokens.shape, schedule, vocab_size)
    return duality.coupled_pair(tokens, times, t, s, mask_id)

  @jax.jit
  def full(rng, tokens, t, s):
    noise = jax.random.normal(rng, tokens.shape + (vocab_size,))  # [B, L, K]
    gamma_t = duality.gamma_from_alpha(schedule.alpha(t), vocab_size)[:, None]
    gamma_s = duality.gamma_from_alpha(schedule.alpha(s), vocab_size)[:, None]
    z_t = duality.project(duality.gaussian_latent(noise, tokens, gamma_t),
                          tokens, mask_id)
    z_s = duality.project(duality.gaussian_latent(noise, tokens, gamma_s),
                          tokens, mask_id)
    return z_t, z_s

  return reduced, full


def time_calls(function, args, repeats):
  """Returns wall-clock seconds of each of `repeats` calls after one warm-up."""
  jax.block_until_ready(function(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    seconds.append(time.perf_counter() - start)
  return seconds


def main():
  args = parse_args()
  if args.smoke:
    args.vocab_size = 1000
    args.repeats = 3

  schedule = schedules.get_schedule(args.schedule)
  reduced, full = build_paths(schedule, args.vocab_size)

  rng = jax.random.key(0)
  token_rng, time_rng, noise_rng = jax.random.split(rng, 3)
  shape = (args.batch_size, args.length)
  tokens = jax.random.randint(token_rng, shape, 0, args.vocab_size)
  t = jax.random.uniform(time_rng, (args.batch_size,), minval=0.1, maxval=1.0)
  s = t - 0.05
  call_args = (noise_rng, tokens, t, s)

  results = {}
  for name, function in [('reduced', reduced), ('full', full)]:
    seconds = time_calls(function, call_args, args.repeats)
    results[name] = {'median_s': statistics.median(seconds),
                     'min_s': min(seconds), 'all_s': seconds}
  ratio = results['full']['median_s'] / results['reduced']['median_s']

  print(f'B={args.batch_size} L={args.length} K={args.vocab_size} '
        f'schedule={args.schedule} repeats={args.repeats}')
  print(f'{"path":<10}{"median ms":>12}{"min ms":>12}')
  for name, result in results.items():
    print(f'{name:<10}{1e3 * result["median_s"]:>12.3f}'
          f'{1e3 * result["min_s"]:>12.3f}')
  print(f'full / reduced (median): {ratio:.0f}x')

  report = {
      'batch_size': args.batch_size,
      'length': args.length,
      'vocab_size': args.vocab_size,
      'schedule': args.schedule,
      'repeats': args.repeats,
      'results': results,
      'ratio_full_over_reduced': ratio,
      'machine': {
          'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind,
          'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(),
          'jax_version': jax.__version__,
      },
  }
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
