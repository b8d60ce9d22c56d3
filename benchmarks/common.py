"""Timing helpers shared by the benchmarks in this folder.

The benchmarks compare functions whose run time is disturbed by whatever else
runs on the machine, so `time_interleaved` calls them in turn within each
repeat and the benchmarks compare medians. A slow spell then slows every
function of one repeat, not all repeats of one function.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

# Makes `from mcd_jax import ...` work when a benchmark runs as a script from
# any directory without installing the package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def time_interleaved(functions: dict, repeats: int) -> dict[str, list[float]]:
  """Times each zero-argument function once per repeat, in turn, after a warm-up.

  Args:
    functions: name -> callable returning JAX arrays (waited on with
      `jax.block_until_ready`).
    repeats: timed calls per function.

  Returns:
    name -> wall-clock seconds of each timed call.
  """
  for function in functions.values():
    jax.block_until_ready(function())  # Compiles, and warms the caches.
  seconds = {name: [] for name in functions}
  for _ in range(repeats):
    for name, function in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(function())
      seconds[name].append(time.perf_counter() - start)
  return seconds


def summarize(seconds: list[float]) -> dict:
  """Median, minimum and every value of a list of timings, in seconds."""
  return {'median_s': statistics.median(seconds), 'min_s': min(seconds),
          'all_s': seconds}


def matmul_function(size: int, dtype=jnp.float32):
  """Returns (a zero-argument jitted [size, size] matmul, its FLOPs 2·size³)."""
  keys = jax.random.split(jax.random.key(0), 2)
  left = jax.random.normal(keys[0], (size, size), dtype)
  right = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return (lambda: matmul(left, right)), 2 * size ** 3


def load_average() -> list[float] | None:
  """Returns the 1, 5 and 15 minute load averages, or None where the OS has none."""
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def cpu_model_name() -> str:
  """Returns the 'Model name' field of `lscpu`, else `platform.processor()`."""
  try:
    output = subprocess.run(['lscpu'], capture_output=True, text=True, check=True,
                            timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    output = ''
  for line in output.splitlines():
    if line.startswith('Model name:'):
      return line.split(':', 1)[1].strip()
  return platform.processor() or platform.machine()


def machine_info() -> dict:
  """Collects the backend, device, CPU, load, date and versions to store beside the numbers."""
  return {
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'cpu_model': cpu_model_name(),
      'load_average': load_average(),
      'jax_version': jax.__version__,
      'date': datetime.date.today().isoformat(),
  }


def write_json(path: str | None, report: dict) -> None:
  """Writes `report` to `path` as indented JSON; does nothing for path None."""
  if not path:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  print(f'Wrote {path}')


def print_table(header: list[str], rows: list[list], widths: list[int] | None = None) -> None:
  """Prints rows under a header; floats get 4 significant digits."""
  if widths is None:
    widths = [max(12, len(name) + 2) for name in header]

  def cell(value, width):
    text = f'{value:.4g}' if isinstance(value, float) else str(value)
    return text.rjust(width)

  print(''.join(name.rjust(width) for name, width in zip(header, widths)))
  for row in rows:
    print(''.join(cell(value, width) for value, width in zip(row, widths)))


def add_sampler_arguments(parser, repeats_help: str) -> None:
  """Adds the model and sampler flags that the sampler and AR benchmarks share."""
  parser.add_argument('--seq-len', type=int, default=128, help='Tokens per sample (L).')
  parser.add_argument('--d-model', type=int, default=256, help='Residual width.')
  parser.add_argument('--num-layers', type=int, default=4, help='Transformer blocks.')
  parser.add_argument('--num-heads', type=int, default=4, help='Attention heads.')
  parser.add_argument('--mlp-dim', type=int, default=1024, help='MLP hidden width.')
  parser.add_argument('--batch-size', type=int, default=8, help='Samples per batch (B).')
  parser.add_argument('--base-steps', type=int, default=256,
                      help="N₀, the teacher's number of sampling steps.")
  parser.add_argument('--step-divisor', type=int, default=16,
                      help='The student samples in N₀ / this many steps.')
  parser.add_argument('--schedule', default='loglinear', help='Masking schedule α_t.')
  parser.add_argument('--repeats', type=int, default=3, help=repeats_help)
  parser.add_argument('--smoke', action='store_true',
                      help='Tiny model (d_model 32, L 32, B 4, N₀ 32) and 2 repeats, for CI.')
  parser.add_argument('--output', default=None,
                      help='Path of the JSON results file. No file is written if unset.')


def parse_sampler_arguments(parser, argv=None):
  """Parses the flags of add_sampler_arguments, applies --smoke and checks N₀."""
  args = parser.parse_args(argv)
  if args.smoke:
    args.d_model, args.num_layers, args.num_heads, args.mlp_dim = 32, 2, 2, 64
    args.seq_len, args.batch_size, args.base_steps, args.repeats = 32, 4, 32, 2
  if args.base_steps % args.step_divisor:
    parser.error(f'--base-steps ({args.base_steps}) must be divisible by '
                 f'--step-divisor ({args.step_divisor}).')
  return args
