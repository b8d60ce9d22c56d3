"""Times the ancestral sampler: teacher at N₀ steps against the student at N₀ / d.

Both models have the same architecture and run at the same batch size. For
each model the sampler runs twice:

  cached:   time_conditioned=False, the shortcut for a time-agnostic model.
            A step reuses the previous logits when no position of the batch
            changed, so the batch runs fewer than N forward passes.
  uncached: time_conditioned=True, one forward pass per step (NFE = N).

overhead = sampler time / (batch forward passes × time of one jitted forward
pass on the same [B, L] batch). A value near 1 means the loop adds little to
the model. The loop's own cost is also timed directly: the teacher's sampler
with a stand-in model that returns constant logits (`loop_*` rows). The cached run's forward passes are counted in an extra untimed run
with the same key, through a wrapper that counts calls on the host.

The sampler runs and the forward pass are timed in turn within each repeat
(see common.time_interleaved), so load from other processes affects them alike.
Examples:

  python benchmarks/sampler_speed.py --output /tmp/sampler_speed.json
  python benchmarks/sampler_speed.py --smoke   # tiny model, seconds
  python benchmarks/sampler_speed.py --workdir workdirs/demo/teacher \\
      --student-workdir workdirs/demo/mcd_data
"""

import argparse
import threading

import common  # Sets up the import path; keep before the mcd_jax imports.
import flax.linen as nn
import jax
import jax.numpy as jnp

from mcd_jax import sampling
from mcd_jax.models import transformer

FORWARD_CALLS_PER_REPEAT = 10


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None,
                      help='Teacher workdir to load with mcd_jax.inference.load. '
                           'Random parameters of the size below if unset.')
  parser.add_argument('--student-workdir', default=None,
                      help='Student workdir; the teacher parameters are reused if unset.')
  parser.add_argument('--vocab-size', type=int, default=80,
                      help='K for random parameters (the Bible character vocabulary is '
                           'about 80).')
  common.add_sampler_arguments(parser, repeats_help='Timed calls per function after one warm-up call.')
  return common.parse_sampler_arguments(parser, argv)


class _Counter:
  """A host-side call counter that jitted code increments through a callback."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def increment(self):
    with self._lock:
      self.count += 1


_FORWARD_CALLS = _Counter()


class CountingModel(nn.Module):
  """Calls `model` and increments `_FORWARD_CALLS` once per executed forward pass."""

  model: nn.Module

  def __call__(self, tokens, t=None, padding_mask=None, deterministic=True):
    jax.debug.callback(_FORWARD_CALLS.increment)
    return self.model(tokens, t, padding_mask=padding_mask, deterministic=deterministic)


class ConstantLogits(nn.Module):
  """Stand-in model with no parameters: zero logits, so only the sampler loop costs time."""

  vocab_size: int

  def __call__(self, tokens, t=None, padding_mask=None, deterministic=True):
    # Depends on the tokens, so XLA cannot hoist the logits out of the loop.
    return jnp.zeros(tokens.shape + (self.vocab_size,), jnp.float32) + 0.0 * tokens[..., None]


def load_models(args):
  """Returns (model, teacher params, student params, vocab size, seq len, schedule)."""
  if args.workdir:
    from mcd_jax import inference  # Imported here: it pulls in the data pipeline.
    teacher = inference.load(args.workdir)
    student = inference.load(args.student_workdir) if args.student_workdir else teacher
    return (teacher.model, teacher.params, student.params, teacher.vocab_size,
            teacher.config.data.seq_len, teacher.schedule)

  model = transformer.Transformer(
      vocab_size=args.vocab_size + 1, output_size=args.vocab_size, d_model=args.d_model,
      num_layers=args.num_layers, num_heads=args.num_heads, mlp_dim=args.mlp_dim)
  tokens = jnp.zeros((1, args.seq_len), jnp.int32)
  init = jax.jit(lambda key: nn.meta.unbox(model.init(key, tokens, None)['params']))
  teacher_params = init(jax.random.key(1))
  student_params = init(jax.random.key(2))
  return (model, teacher_params, student_params, args.vocab_size, args.seq_len,
          sampling.resolve_schedule(args.schedule))


def count_batch_forward_passes(model, params, key, settings) -> int:
  """Runs the sampler once through CountingModel; returns the forward passes executed."""
  counting = CountingModel(model)
  _FORWARD_CALLS.count = 0
  output = sampling.ancestral_sample(counting, {'model': params}, key, **settings)
  jax.block_until_ready(output)
  jax.effects_barrier()  # Waits for the host callbacks.
  return _FORWARD_CALLS.count


def main(argv=None):
  args = parse_args(argv)
  model, teacher_params, student_params, vocab_size, seq_len, schedule = load_models(args)
  batch_size = args.batch_size
  key = jax.random.key(0)
  roles = {'teacher': (teacher_params, args.base_steps),
           'student': (student_params, args.base_steps // args.step_divisor)}

  # One forward pass on a half-masked batch, the same shape the sampler feeds.
  forward = jax.jit(lambda params, tokens: model.apply({'params': params}, tokens, None))
  tokens = jax.random.randint(key, (batch_size, seq_len), 0, vocab_size + 1)

  def forward_calls():
    # Several calls per repeat: one call is short, so a single timing is noisy.
    return [forward(teacher_params, tokens) for _ in range(FORWARD_CALLS_PER_REPEAT)]

  functions = {'forward': forward_calls}
  settings = {}
  for role, (params, num_steps) in roles.items():
    for cached in (True, False):
      name = f'{role}_{"cached" if cached else "uncached"}'
      settings[name] = dict(batch_size=batch_size, seq_len=seq_len, num_steps=num_steps,
                            schedule=schedule, mask_id=vocab_size,
                            time_conditioned=not cached)
      functions[name] = (lambda params=params, kwargs=settings[name]:
                         sampling.ancestral_sample(model, params, key, **kwargs))

  constant = ConstantLogits(vocab_size)
  for cached in (True, False):
    loop_settings = dict(settings[f'teacher_{"cached" if cached else "uncached"}'])
    functions[f'loop_{"cached" if cached else "uncached"}'] = (
        lambda kwargs=loop_settings: sampling.ancestral_sample(constant, {}, key, **kwargs))

  seconds = common.time_interleaved(functions, args.repeats)
  seconds['forward'] = [value / FORWARD_CALLS_PER_REPEAT for value in seconds['forward']]
  forward_s = common.summarize(seconds['forward'])['median_s']

  results = {}
  for name, kwargs in settings.items():
    params = roles[name.split('_')[0]][0]
    timing = common.summarize(seconds[name])
    output = sampling.ancestral_sample(model, params, key, **kwargs)
    batch_forwards = kwargs['num_steps']  # time_conditioned: one pass per step.
    if not kwargs['time_conditioned']:
      batch_forwards = count_batch_forward_passes(model, params, key, kwargs)
    results[name] = dict(
        timing,
        num_steps=kwargs['num_steps'],
        batch_forward_passes=batch_forwards,
        mean_nfe_per_sample=float(jnp.mean(output.nfe)),
        seconds_per_sample=timing['median_s'] / batch_size,
        tokens_per_second=batch_size * seq_len / timing['median_s'],
        overhead=timing['median_s'] / (batch_forwards * forward_s))

  header = ['sampler', 'steps', 'fwd/batch', 'NFE/sample', 's/sample', 'tokens/s',
            'overhead']
  rows = [[name, r['num_steps'], r['batch_forward_passes'], r['mean_nfe_per_sample'],
           r['seconds_per_sample'], r['tokens_per_second'], r['overhead']]
          for name, r in results.items()]
  print(f'B={batch_size} L={seq_len} K={vocab_size} d_model={model.d_model} '
        f'layers={model.num_layers} N0={args.base_steps} repeats={args.repeats}; '
        f'one forward pass: {1e3 * forward_s:.2f} ms (median)')
  common.print_table(header, rows, [18, 7, 11, 12, 12, 12, 10])
  speedup = results['teacher_cached']['median_s'] / results['student_cached']['median_s']
  print(f'student speed-up over the teacher (cached, median): {speedup:.1f}x')
  loop = {}
  for name in ('loop_cached', 'loop_uncached'):
    timing = common.summarize(seconds[name])
    per_step = timing['median_s'] / args.base_steps
    loop[name] = dict(timing, seconds_per_step=per_step,
                      fraction_of_forward=per_step / forward_s)
    print(f'{name}: {1e3 * per_step:.3f} ms per step without the model '
          f'({100 * per_step / forward_s:.1f}% of one forward pass)')

  report = {
      'batch_size': batch_size, 'seq_len': seq_len, 'vocab_size': vocab_size,
      'd_model': model.d_model, 'num_layers': model.num_layers,
      'base_steps': args.base_steps, 'step_divisor': args.step_divisor,
      'repeats': args.repeats, 'workdir': args.workdir,
      'student_workdir': args.student_workdir,
      'forward': common.summarize(seconds['forward']),
      'results': results,
      'loop': loop,
      'student_speedup_cached': speedup,
      'machine': common.machine_info(),
  }
  common.write_json(args.output, report)
  return report


if __name__ == '__main__':
  main()
