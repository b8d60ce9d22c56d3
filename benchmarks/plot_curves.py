r"""Plots the validation curves of training runs from their metrics.jsonl files.

  python benchmarks/plot_curves.py --output docs/figures/gutenberg_char_validation.png \
      workdirs/gutenberg_char workdirs/gutenberg_char_ar

Each workdir contributes one line per `val_*` metric (validation ELBO of a
masked-diffusion run, bits per token of an autoregressive one) against the
training step. Nothing is trained or evaluated: the points are those the
trainer logged every `train.eval_every` steps.
"""

import argparse
import json
import os


def read_validation(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Returns {metric name: [(step, value), ...]} of the `val_*` records in a workdir."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise SystemExit(f'error: {path} not found. Pass the folder given as --workdir to a training run.')

  curves = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      for key, value in record.items():
        if key.startswith('val_'):
          curves.setdefault(key, []).append((record['step'], value))

  # A resumed run may log a step twice: keep the last value of each step.
  return {key: sorted(dict(points).items()) for key, points in curves.items()}


def plot(workdirs: list[str], output: str, title: str) -> None:
  """Writes one PNG with every validation curve of `workdirs`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, axis = plt.subplots(figsize=(6.4, 4.4))
  for workdir in workdirs:
    for key, points in read_validation(workdir).items():
      steps, values = zip(*points)
      label = f'{os.path.basename(os.path.normpath(workdir))}: {key[len("val_"):]}'
      axis.plot(steps, values, marker='o', label=label)
      axis.annotate(f'{values[-1]:.3f}', (steps[-1], values[-1]), textcoords='offset points',
                    xytext=(4, 4), fontsize=8)
  axis.set_xlabel('training step')
  axis.set_ylabel('validation bits per token')
  axis.set_title(title)
  axis.grid(True, alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()

  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  figure.savefig(output, dpi=120)
  plt.close(figure)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', help='training run workdirs')
  parser.add_argument('--output', required=True, help='PNG file to write')
  parser.add_argument('--title', default='Validation bits per token')
  args = parser.parse_args(argv)
  plot(args.workdirs, args.output, args.title)
  print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
