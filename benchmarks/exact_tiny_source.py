"""Exact KL to the source of the teacher and of the exact MCD optimum on tiny sources.

For each source (a random Markov chain and a mixture of product distributions,
sequences of L symbols over V) and each student step count N, prints:

  teacher KL    the exact posterior teacher's N-step ancestral sampler, KL(sampler ‖ source);
  mcd KL        the sampler of the exact reverse-KL MCD optimum, trained with the
                data coupling and the teacher step Δ = 1 / (2N), so its step is 2Δ;
  tempered KL   the teacher with its temperature tuned so its sampler's entropy
                matches the MCD student's (the sharpening-only control);

with entropies in nats. Run from the repository root:

  PYTHONPATH=. python benchmarks/exact_tiny_source.py --seq_len 6 --vocab_size 4 --seed 0
"""

import argparse

import numpy as np

from mcd_jax import exact
from mcd_jax import schedules


def evaluate(source, seq_len, vocab_size, step_counts, schedule):
  teacher = exact.posterior_denoiser(source, seq_len, vocab_size)
  print(f'  source entropy {exact.entropy(source):.4f}')
  print('  N  teacher KL  (entropy)   mcd KL  (entropy)  change  tempered KL  (temperature)')
  for num_steps in step_counts:
    delta = 0.5 / num_steps
    teacher_q = exact.sampler_distribution(teacher, num_steps, schedule, seq_len, vocab_size)
    tables = {}

    def student(t, delta=delta, tables=tables):
      if t not in tables:
        tables[t] = exact.mcd_optimal_denoiser(source, seq_len, vocab_size, t, delta, schedule,
                                               teacher_table=teacher)
      return tables[t]

    student_q = exact.sampler_distribution(student, num_steps, schedule, seq_len, vocab_size)
    temperature, tempered_q = exact.entropy_matched_sampler(
        teacher, exact.entropy(student_q), num_steps, schedule, seq_len, vocab_size)

    teacher_kl = exact.kl_divergence(teacher_q, source)
    student_kl = exact.kl_divergence(student_q, source)
    print(f'  {num_steps:<2d} {teacher_kl:10.4f}  ({exact.entropy(teacher_q):.3f})  '
          f'{student_kl:8.4f}  ({exact.entropy(student_q):.3f})  '
          f'{100 * (student_kl / teacher_kl - 1):+5.1f}%  '
          f'{exact.kl_divergence(tempered_q, source):10.4f}  ({temperature:.3f})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seq_len', type=int, default=6, help='sequence length L')
  parser.add_argument('--vocab_size', type=int, default=4, help='number of symbols V')
  parser.add_argument('--seed', type=int, default=0, help='seed of the random sources')
  parser.add_argument('--steps', type=int, nargs='+', default=[1, 2, 4, 8],
                      help='student step counts N')
  parser.add_argument('--schedule', default='linear', help='masking schedule name')
  args = parser.parse_args()

  schedule = schedules.get_schedule(args.schedule)
  sources = {
      'markov': exact.markov_source(args.seq_len, args.vocab_size, args.seed),
      'mixture': exact.mixture_source(args.seq_len, args.vocab_size, args.seed),
  }
  for name, source in sources.items():
    print(f'{name} source, L={args.seq_len}, V={args.vocab_size}, seed={args.seed}, '
          f'{args.schedule} schedule')
    evaluate(source, args.seq_len, args.vocab_size, args.steps, schedule)


if __name__ == '__main__':
  main()
