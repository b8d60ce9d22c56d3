"""Times autoregressive sampling with a KV cache beside the MCD student at N₀ / d steps.

All models have the same width, depth and sequence length. The autoregressive
(AR) model is the causal Transformer that embeds K ids. The student is the
bidirectional masked diffusion Transformer that embeds K + 1 ids. Three samplers
generate B sequences of L tokens:

  ar_cached:   mcd_jax.decoding.sample with the key/value cache, one token per
               step from a 1-token prompt (the model has no BOS token).
  ar_uncached: the same draws, rerunning the full causal pass at every step.
  mcd_student: the ancestral sampler at N₀ / d steps with logit caching
               (time-agnostic model).

Parameters are random: time per sample does not depend on their values. The
three samplers are timed in turn within each repeat (common.time_interleaved).
Examples:

  python benchmarks/ar_baseline.py --output /tmp/ar_baseline.json
  python benchmarks/ar_baseline.py --smoke   # tiny model, seconds
"""

import argparse

import common  # Sets up the import path; keep before the mcd_jax imports.
import flax.linen as nn
import jax
import jax.numpy as jnp

from mcd_jax import decoding
from mcd_jax import sampling
from mcd_jax.models import transformer


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vocab-size', type=int, default=80,
                      help='K (the Bible character vocabulary is about 80).')
  common.add_sampler_arguments(parser, repeats_help='Timed calls per sampler after one warm-up call.')
  return common.parse_sampler_arguments(parser, argv)


def init_params(model, seq_len: int, seed: int):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  init = jax.jit(lambda key: nn.meta.unbox(model.init(key, tokens, None)['params']))
  return init(jax.random.key(seed))


def main(argv=None):
  args = parse_args(argv)
  size = dict(d_model=args.d_model, num_layers=args.num_layers, num_heads=args.num_heads,
              mlp_dim=args.mlp_dim)
  ar_model = transformer.Transformer(vocab_size=args.vocab_size, output_size=args.vocab_size,
                                     causal=True, **size)
  student = transformer.Transformer(vocab_size=args.vocab_size + 1,
                                    output_size=args.vocab_size, **size)
  ar_params = init_params(ar_model, args.seq_len, 1)
  student_params = init_params(student, args.seq_len, 2)
  key = jax.random.key(0)
  prompt = jnp.zeros((args.batch_size, 1), jnp.int32)
  student_steps = args.base_steps // args.step_divisor

  def ar(use_cache):
    return lambda: decoding.sample(ar_model, ar_params, key, prompt, seq_len=args.seq_len,
                                   use_cache=use_cache)

  def mcd_student():
    return sampling.ancestral_sample(
        student, student_params, key, batch_size=args.batch_size, seq_len=args.seq_len,
        num_steps=student_steps, schedule=args.schedule, mask_id=args.vocab_size,
        time_conditioned=False)

  functions = {'ar_cached': ar(True), 'ar_uncached': ar(False), 'mcd_student': mcd_student}
  seconds = common.time_interleaved(functions, args.repeats)
  nfe = {'ar_cached': args.seq_len - 1, 'ar_uncached': args.seq_len - 1,
         'mcd_student': student_steps}

  results = {}
  for name in functions:
    timing = common.summarize(seconds[name])
    results[name] = dict(timing, model_calls=nfe[name],
                         seconds_per_sample=timing['median_s'] / args.batch_size,
                         tokens_per_second=args.batch_size * args.seq_len / timing['median_s'])
  cache_speedup = results['ar_uncached']['median_s'] / results['ar_cached']['median_s']
  student_speedup = results['ar_cached']['median_s'] / results['mcd_student']['median_s']

  print(f'B={args.batch_size} L={args.seq_len} K={args.vocab_size} d_model={args.d_model} '
        f'layers={args.num_layers} student steps={student_steps} repeats={args.repeats}')
  common.print_table(
      ['sampler', 'model calls', 's/sample', 'tokens/s'],
      [[name, r['model_calls'], r['seconds_per_sample'], r['tokens_per_second']]
       for name, r in results.items()],
      [14, 13, 12, 12])
  print(f'KV cache speed-up (uncached / cached, median): {cache_speedup:.1f}x')
  print(f'MCD student speed-up over cached AR (median): {student_speedup:.1f}x')

  report = {
      'batch_size': args.batch_size, 'seq_len': args.seq_len, 'vocab_size': args.vocab_size,
      'd_model': args.d_model, 'num_layers': args.num_layers,
      'base_steps': args.base_steps, 'student_steps': student_steps,
      'repeats': args.repeats, 'results': results,
      'kv_cache_speedup': cache_speedup, 'student_speedup_over_ar_cached': student_speedup,
      'machine': common.machine_info(),
  }
  common.write_json(args.output, report)
  return report


if __name__ == '__main__':
  main()
