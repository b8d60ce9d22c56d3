r"""Per-device memory of the paper-scale config on common accelerators: an analytic estimate.

For configs/owt_gpt2_small.py (d_model 768, 12 layers, 12 heads, MLP 3072,
L = 1024, GPT-2 vocabulary K = 50257, global batch 512, bfloat16 compute) it
counts the parameters twice, with a closed formula and with `jax.eval_shape` of
the real model (both include the rows that pad the vocabulary to a multiple
of model.pad_vocab_multiple), and then estimates each device's memory for
several meshes:

  teacher training (task diffusion): params + gradients + AdamW + EMA + activations
  MCD distillation (task distill):   the same for the student, plus the frozen
                                     teacher's params and its float32 target

Nothing is allocated: the shardings come from the config's logical axis rules
on a `jax.sharding.AbstractMesh`, so any mesh size works on one CPU. Run from
the repository root:

  PYTHONPATH=. python benchmarks/memory_table.py --output /tmp/memory_table.json

The activation formula below gives bytes per device. In it, b is the
per-device batch and c the compute dtype's bytes (2 for bfloat16). T is the
number of shards the rules split a logical axis into (1 when unsharded), and K
is the number of output logits:

  kept per layer without remat:  b·L·(c·(4d + 4d/T + 2·mlp/T) + 4·L·H/T)
      (4d: block input, both norm outputs and the attention residual. 4d/T:
      q, k, v and the attention output. 2·mlp/T: the MLP before and after
      GELU. 4·L·H/T: the float32 softmax.)
  kept per layer with remat:     b·L·c·d (the block input), plus the full set
                                 of one layer while it is recomputed
  logits:                        b·L·(c·K'/T + 8·K/T) (head output over the
                                 padded vocabulary K', float32 logits and
                                 float32 log-probabilities)
  distillation adds:             b·L·(K/T)·4 for the teacher's log-probabilities

It ignores dropout masks, LayerNorm statistics, the bfloat16 weight copies
and the temporary buffers of XLA, so leave headroom (--usable_fraction).
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh

from mcd_jax import sharding
from mcd_jax import train_state
from mcd_jax.models import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'owt_gpt2_small.py')
GPT2_VOCAB_SIZE = 50257
GIB = 2**30

# Nominal memory per device in GiB. The usable part is smaller: JAX on GPU
# preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
ACCELERATORS = (
    ('TPU v4', 32),
    ('TPU v5e', 16),
    ('TPU v5p', 95),
    ('A100 40GB', 40),
    ('A100 80GB', 80),
    ('H100 80GB', 80),
    ('H200', 141),
)


@dataclasses.dataclass(frozen=True)
class MeshChoice:
  name: str
  shape: tuple[int, int, int]  # (data, fsdp, tensor)


MESH_CHOICES = (
    MeshChoice('data 8', (8, 1, 1)),
    MeshChoice('data 64', (64, 1, 1)),
    MeshChoice('fsdp 8', (1, 8, 1)),
    MeshChoice('data 8 x fsdp 8', (8, 8, 1)),
    MeshChoice('fsdp 8 x tensor 2', (1, 8, 2)),
    MeshChoice('data 4 x fsdp 8 x tensor 2', (4, 8, 2)),
)
TASKS = ('diffusion', 'distill')


def load_config(path: str):
  """Imports a config file and returns its get_config()."""
  spec = importlib.util.spec_from_file_location('memory_table_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def padded(size: int, multiple: int) -> int:
  """Rounds `size` up to a multiple of `multiple`, as the model pads the vocabulary."""
  return -(-size // multiple) * multiple


def analytic_param_count(model: transformer.Transformer) -> int:
  """Counts the parameters of `model` from its shape alone, padded rows included."""
  d, mlp = model.d_model, model.mlp_dim
  input_size = padded(model.vocab_size, model.pad_vocab_multiple)
  output_size = padded(model.output_size, model.pad_vocab_multiple)
  embedding = input_size * d
  attention = 4 * d * d  # query, key, value and output projections, no biases.
  mlp_params = d * mlp + mlp + mlp * d + d
  norms = 2 * 2 * d if not model.time_conditioning else 0
  modulation = d * 6 * d + 6 * d if model.time_conditioning else 0
  per_layer = attention + mlp_params + norms + modulation

  head = d * output_size + output_size
  if model.time_conditioning:
    time_mlp = transformer.TIME_EMBEDDING_DIM * d + d + d * d + d
    final = d * 2 * d + 2 * d + time_mlp
  else:
    final = 2 * d  # Affine final LayerNorm.
  return embedding + model.num_layers * per_layer + final + head


def mesh_rules(config) -> tuple:
  return tuple(tuple(rule) for rule in config.mesh.axis_rules)


def axis_divisor(rules, logical_name: str, mesh_sizes: dict[str, int]) -> int:
  """Returns the number of shards that `rules` split the logical axis into."""
  for name, target in rules:
    if name != logical_name:
      continue
    if target is None:
      return 1
    targets = (target,) if isinstance(target, str) else tuple(target)
    return int(np.prod([mesh_sizes[axis] for axis in targets]))
  return 1


def shard_bytes(tree, shardings, mesh_sizes: dict[str, int]) -> tuple[int, list[str]]:
  """Returns the bytes stored per device and the leaves whose dimensions do not divide evenly.

  JAX rejects such shardings (IndivisibleError), so a non-empty list means the
  mesh cannot run with these rules. The bytes then count rounded-up shards.
  """
  total, indivisible = 0, []
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  sharding_leaves = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  for (path, leaf), leaf_sharding in zip(leaves, sharding_leaves):
    spec = tuple(leaf_sharding.spec) + (None,) * (len(leaf.shape) - len(leaf_sharding.spec))
    shard_shape = []
    for size, axes in zip(leaf.shape, spec):
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      parts = int(np.prod([mesh_sizes[axis] for axis in axes]))
      if size % parts:
        indivisible.append(f'{jax.tree_util.keystr(path)} axis of size {size} over {parts}')
      shard_shape.append(math.ceil(size / parts))
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total, indivisible


def abstract_state(config, model, choice: MeshChoice):
  """Builds the real model's abstract train state and its shardings on an abstract mesh."""
  mesh = AbstractMesh(choice.shape, sharding.MESH_AXES)
  tx = train_state.make_optimizer(config.optim, config.train.num_steps)
  init = lambda rng: train_state._init_boxed_state(  # pylint: disable=protected-access
      model, tx, rng, 1, config.data.seq_len)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, mesh_rules(config))
  return nn.meta.unbox(boxed), shardings


def activation_bytes(config, model, batch_per_device: int, rules,
                     mesh_sizes: dict[str, int], remat: bool, task: str) -> dict[str, int]:
  """Estimates activation bytes with the module docstring's formula, blocks and logits apart."""
  model_config = config.model
  d, mlp, heads = model_config.d_model, model_config.mlp_dim, model_config.num_heads
  seq_len = config.data.seq_len
  c = 2 if model_config.dtype == 'bfloat16' else 4
  heads_t = math.ceil(heads / axis_divisor(rules, 'heads', mesh_sizes))
  mlp_t = math.ceil(mlp / axis_divisor(rules, 'mlp', mesh_sizes))
  vocab_parts = axis_divisor(rules, 'vocab', mesh_sizes)
  padded_vocab_t = math.ceil(padded(model.output_size, model.pad_vocab_multiple) / vocab_parts)
  vocab_t = math.ceil(model.output_size / vocab_parts)
  tokens = batch_per_device * seq_len

  full_layer = tokens * (c * (4 * d + 4 * heads_t * (d // heads) + 2 * mlp_t)
                         + 4 * seq_len * heads_t)
  if remat:
    blocks = model_config.num_layers * tokens * c * d + full_layer
  else:
    blocks = model_config.num_layers * full_layer

  logits = tokens * (c * padded_vocab_t + 8 * vocab_t)
  estimate = {'activations (blocks)': blocks, 'logits': logits}
  if task == 'distill':
    estimate['teacher log-probs'] = tokens * vocab_t * 4
  return estimate


def estimate_row(config, model, abstract, choice: MeshChoice, task: str, remat: bool,
                 usable_fraction: float) -> dict:
  """Estimates the per-device bytes of each part of one (mesh, task, remat) combination.

  `abstract` is abstract_state(config, model, choice).
  """
  mesh_sizes = dict(zip(sharding.MESH_AXES, choice.shape))
  rules = mesh_rules(config)
  state, shardings = abstract
  params, indivisible = shard_bytes(state.params, shardings.params, mesh_sizes)
  opt_state, _ = shard_bytes(state.opt_state, shardings.opt_state, mesh_sizes)
  batch_shards = choice.shape[0] * choice.shape[1]
  batch_per_device = config.data.batch_size // batch_shards

  parts = {
      'params': params,
      'gradients': params,  # float32, sharded like the params.
      'AdamW state': opt_state,
      'EMA params': params,
  }
  if task == 'distill':
    parts['teacher params'] = params  # float32: a copy of the student's params.
  parts.update(activation_bytes(config, model, batch_per_device, rules, mesh_sizes, remat,
                                task))
  total = sum(parts.values())
  fits = {name: bool(not indivisible and total <= usable_fraction * size * GIB)
          for name, size in ACCELERATORS}
  return {
      'task': task,
      'mesh': choice.name,
      'mesh_shape': list(choice.shape),
      'devices': int(np.prod(choice.shape)),
      'batch_per_device': batch_per_device,
      'remat': remat,
      'bytes': parts,
      'total_bytes': total,
      'indivisible': sorted(set(indivisible)),
      'fits': fits,
  }


def format_table(rows: list[dict]) -> str:
  """Formats rows as Markdown: one line per combination, one fit column per accelerator."""
  names = [name for name, _ in ACCELERATORS]
  header = ['task', 'mesh (data, fsdp, tensor)', 'devices', 'batch/device', 'remat',
            'state GiB', 'activations GiB', 'total GiB'] + names
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  state_parts = ('params', 'gradients', 'AdamW state', 'EMA params', 'teacher params')
  for row in rows:
    state = sum(row['bytes'].get(part, 0) for part in state_parts)
    activations = row['total_bytes'] - state
    if row['indivisible']:
      fits = ['invalid'] * len(names)
    else:
      fits = ['yes' if row['fits'][name] else 'no' for name in names]
    cells = [row['task'], f"{row['mesh']} {tuple(row['mesh_shape'])}", str(row['devices']),
             str(row['batch_per_device']), 'on' if row['remat'] else 'off',
             f'{state / GIB:.2f}', f'{activations / GIB:.2f}',
             f"{row['total_bytes'] / GIB:.2f}"] + fits
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description='Estimate per-device memory of the paper-scale config (no allocation).')
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='Config file with get_config() (default: %(default)s).')
  parser.add_argument('--vocab_size', type=int, default=GPT2_VOCAB_SIZE,
                      help='K, the number of real tokens; the model embeds K + 1 ids '
                           '(default: %(default)s, the GPT-2 vocabulary).')
  parser.add_argument('--usable_fraction', type=float, default=0.9,
                      help='Fraction of nominal device memory a run may use; the rest '
                           'is left for XLA buffers this estimate ignores (default: '
                           '%(default)s).')
  parser.add_argument('--output', default=None, help='Write the table as JSON to this path.')
  args = parser.parse_args(argv)
  if not 0.0 < args.usable_fraction <= 1.0:
    parser.error(f'--usable_fraction must be in (0, 1], got {args.usable_fraction}.')
  if args.vocab_size < 2:
    parser.error(f'--vocab_size must be at least 2, got {args.vocab_size}.')
  return args


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  config = load_config(args.config)
  output_size, input_size = args.vocab_size, args.vocab_size + 1  # + the mask token.
  model = transformer.from_config(config.model, vocab_size=input_size,
                                  output_size=output_size, causal=False)

  # ---- Parameter count: formula and eval_shape of the real model ----
  analytic = analytic_param_count(model)
  state, _ = abstract_state(config, model, MESH_CHOICES[0])
  counted = transformer.count_params(state.params)
  print(f'Parameters: {counted:,} (eval_shape), {analytic:,} (formula), with the vocabulary '
        f'padded to a multiple of {model.pad_vocab_multiple}.')
  if analytic != counted:
    print('WARNING: the formula and eval_shape disagree; the formula in '
          'analytic_param_count is out of date.', file=sys.stderr)

  # ---- Per-device memory ----
  choices = [choice for choice in MESH_CHOICES
             if config.data.batch_size % (choice.shape[0] * choice.shape[1]) == 0]
  abstract = {choice: abstract_state(config, model, choice) for choice in choices}
  rows = []
  for task in TASKS:
    for choice in choices:
      for remat in (False, True):
        rows.append(estimate_row(config, model, abstract[choice], choice, task, remat,
                                 args.usable_fraction))
  table = format_table(rows)
  print(table)
  for row in rows:
    if row['indivisible'] and not row['remat'] and row['task'] == TASKS[0]:
      print(f"invalid: {row['mesh']}: " + '; '.join(row['indivisible']))

  record = {
      'date': datetime.date.today().isoformat(),
      'config': os.path.relpath(args.config, REPO),
      'vocab_size': output_size,
      'usable_fraction': args.usable_fraction,
      'param_count': {'eval_shape': counted, 'analytic': analytic},
      'accelerators_gib': dict(ACCELERATORS),
      'rows': rows,
      'table': table,
  }
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
    print(f'Wrote {args.output}')
  return record


if __name__ == '__main__':
  main()
