"""Device mesh, logical-axis rules and the per-device memory estimate.

Parameters carry logical axis names ('embed', 'mlp', ...); the config maps them
to mesh axes (data, fsdp, tensor). The same rules place the student, the
teacher, the optimizer state and the EMA parameters, and the batch is split
over (data, fsdp). One CPU device is the mesh (1, 1, 1) and needs no other path.
"""

from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')


class ShardingError(ValueError):
  """A mesh that does not fit the devices, or a state that does not fit memory."""


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry of `shape` so the product equals `num_devices`."""
  shape = tuple(int(size) for size in shape)
  if shape.count(-1) > 1:
    raise ShardingError(f'mesh.shape {shape} may contain -1 at most once.')
  if any(size == 0 or size < -1 for size in shape):
    raise ShardingError(f'mesh.shape {shape} must contain positive sizes or -1.')

  known = int(np.prod([size for size in shape if size != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ShardingError(
          f'mesh.shape {shape} does not divide the {num_devices} devices: the '
          f'fixed axes use {known}. Choose sizes whose product divides {num_devices}.')
    shape = tuple(num_devices // known if size == -1 else size for size in shape)

  if int(np.prod(shape)) != num_devices:
    raise ShardingError(
        f'mesh.shape {shape} uses {int(np.prod(shape))} devices but '
        f'{num_devices} are available. Set mesh.shape so the product is '
        f'{num_devices}, or use -1 for one axis.')
  return shape


def create_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  resolved = mesh_shape(shape, len(devices))
  device_grid = np.asarray(devices).reshape(resolved)
  return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree with logical partitioning boxes to NamedShardings.

  The result has the structure of the unboxed tree: one NamedSharding per
  array. Leaves without logical names (step counters, scalars) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(rule) for rule in rules))


def global_batch_from_local(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles each process's rows of the global batch into one sharded array."""
  sharding = batch_sharding(mesh)
  return jax.make_array_from_process_local_data(sharding, local_batch)


def tree_bytes(tree: Any) -> int:
  """Total bytes of the arrays (or ShapeDtypeStructs) in `tree`."""
  leaves = jax.tree_util.tree_leaves(tree)
  return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Computes the bytes of `tree` on the most loaded device under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total


def activation_bytes_estimate(batch_per_device: int, seq_len: int, d_model: int,
                              mlp_dim: int, num_layers: int, num_heads: int,
                              dtype_bytes: int, remat: bool) -> int:
  """Estimates the activation memory one training step keeps for backprop.

  Per layer and token: the residual stream, attention inputs and outputs,
  the MLP hidden layer and the attention probabilities. With remat only the
  block inputs are kept. This is an estimate, not a measurement.
  """
  per_token_per_layer = (6 * d_model + 2 * mlp_dim) * dtype_bytes
  attention = num_heads * seq_len * 4
  if remat:
    per_token_per_layer = d_model * dtype_bytes
    attention = 0
  per_layer = batch_per_device * seq_len * (per_token_per_layer + attention)
  return int(per_layer * num_layers)


def device_memory_bytes() -> int | None:
  """Returns the first local device's memory limit, or None where the backend has none (CPU)."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  if not stats:
    return None
  return stats.get('bytes_limit')


def check_memory(estimate: dict[str, int]) -> None:
  """Logs the per-device estimate and raises ShardingError when it cannot fit."""
  total = sum(estimate.values())
  lines = [f'  {name:<18s} {size / 2**20:10.1f} MiB' for name, size in estimate.items()]
  logging.info('Memory estimate per device:\n%s\n  %-18s %10.1f MiB', '\n'.join(lines),
               'total', total / 2**20)
  limit = device_memory_bytes()
  if limit is not None and total > limit:
    raise ShardingError(
        f'The run needs about {total / 2**30:.2f} GiB per device but the device has '
        f'{limit / 2**30:.2f} GiB. Lower data.batch_size, turn on model.remat, use '
        'bfloat16, or shard more (mesh.shape with fsdp > 1).')
