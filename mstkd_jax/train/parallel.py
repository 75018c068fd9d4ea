"""Data parallelism, chosen in one place: `jax.pmap` (default) or `jax.jit` over `shard_map`.

Step functions are written per device: they see one device's batch, average gradients with
`lax.pmean(..., AXIS)` and keep BatchNorm statistics global through the same axis. The host
always feeds batches shaped [local_devices, per_device_batch, ...]; this module replicates
the state, places batches and wraps step functions for either backend, on one host or many.

With several JAX processes (hosts) both backends span every device of every process: each
process feeds its own rows of a global batch to its local devices, the collectives inside
a step run over all devices, and every process reads back identical replicated values.
pmap (since JAX 0.8 a jit over shard_map) takes each process's local [local_devices, ...]
arrays as they are when it is not pinned to local devices; shard_map takes global arrays
assembled from every process's rows (`jax.make_array_from_process_local_data`).

With a class-sharded margin head (`with_class_shards`) the class centres and their
optimizer buffers are the one exception to "replicated": `replicate` splits them by
columns over the devices (pmap: block i on device i; shard_map: one global [D, N x S]
array sharded P(None, AXIS)), `unreplicate` joins them back into the host's whole [D, C],
and the wrapped step keeps them split (see train/sharded_head.py).
"""

import copy
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mstkd_jax.errors import UserError
from mstkd_jax.train import sharded_head

AXIS = "batch"
KINDS = ("pmap", "shard_map")


class DataParallel:
  """Places arrays and wraps per-device functions for the chosen parallelism."""

  def __init__(self, kind: str = "pmap", num_devices: int = 0, devices=None):
    """`num_devices` > 0 uses only the first local devices (single-host runs only).

    `devices`: instead of this process's devices, these (compile-only devices of a TPU
    topology, `mstkd_jax.plan`): functions are wrapped, lowered and compiled over them,
    never run, and no array is placed.
    """
    if kind not in KINDS:
      raise UserError(f"config field parallelism={kind!r}: expected one of {KINDS}")
    self.kind = kind
    if devices is None:
      self.local_devices, devices = jax.local_devices(), jax.devices()
    else:
      self.local_devices = devices = list(devices)
    if num_devices:
      if jax.process_count() > 1 or not 0 < num_devices <= len(self.local_devices):
        raise UserError(f"config field num_devices={num_devices}: expected 0 (all) or 1.."
                        f"{len(self.local_devices)} on a single host")
      self.local_devices = devices = self.local_devices[:num_devices]
    self.mesh = Mesh(np.asarray(devices), (AXIS,))
    # pmap pinned to this host's devices would average gradients over them only; unpinned,
    # it maps over the devices of every process (the same devices on a single host).
    self._pmap_devices = None if jax.process_count() > 1 else self.local_devices
    # pmap's arrays carry a leading axis of local devices, split over this host's devices.
    self._local_split = NamedSharding(Mesh(np.asarray(self.local_devices), (AXIS,)), P(AXIS))
    self.class_shards: sharded_head.ClassShards | None = None

  def with_class_shards(self, num_classes: int, sample_rate: float = 1.0) -> "DataParallel":
    """A copy of this DataParallel whose states keep the class centres split over the
    devices (train/sharded_head.py); compiled functions are not shared with the original.

    Raises:
      UserError: pmap over several processes (use parallelism=shard_map).
    """
    if self.kind == "pmap" and jax.process_count() > 1:
      raise UserError("config field head.shard_classes=True with parallelism='pmap' runs on "
                      "one process only; set parallelism=shard_map for several hosts")
    twin = copy.copy(self)
    twin.class_shards = sharded_head.ClassShards(num_classes, self.device_count, sample_rate)
    return twin

  def _sharded(self, path, leaf, on_device: bool = False) -> bool:
    """Whether a leaf is class centres (host [D, C]; pmap's device blocks [N, D, S])."""
    if self.class_shards is None:
      return False
    leading = 1 if on_device and self.kind == "pmap" else 0
    return sharded_head.is_kernel(path, leaf, leading)

  @property
  def local_device_count(self) -> int:
    return len(self.local_devices)

  @property
  def device_count(self) -> int:
    return self.mesh.size

  def replicate(self, tree):
    """Host pytree -> the same values on every device (class centres split, see above)."""
    if self.class_shards is not None:
      return jax.tree_util.tree_map_with_path(
          lambda p, x: self._split(x) if self._sharded(p, x) else self._replicate(x), tree)
    return jax.tree.map(self._replicate, tree)

  def _replicate(self, x):
    if self.kind == "pmap":
      return jax.device_put(np.stack([np.asarray(x)] * self.local_device_count),
                            self._local_split)
    return jax.make_array_from_callback(np.shape(x), NamedSharding(self.mesh, P()),
                                        lambda idx: np.asarray(x)[idx])

  def unreplicate(self, tree):
    """Replicated device pytree -> one host (numpy) copy (class centres joined whole)."""
    if self.class_shards is not None:
      return jax.tree_util.tree_map_with_path(
          lambda p, x: (self._join(x) if self._sharded(p, x, on_device=True)
                        else self._unreplicate(x)), tree)
    return jax.tree.map(self._unreplicate, tree)

  def _unreplicate(self, x):
    if self.kind == "pmap":
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x.addressable_data(0))

  def _split(self, x):
    """Host [D, C] class centres -> device blocks (pmap [N, D, S]; shard_map [D, N x S])."""
    shards = self.class_shards
    if self.kind == "pmap":
      return jax.device_put(sharded_head.split_host(x, shards), self._local_split)
    padded = sharded_head.split_host(x, shards).transpose(1, 0, 2).reshape(np.shape(x)[0], -1)
    return jax.make_array_from_callback(padded.shape, NamedSharding(self.mesh, P(None, AXIS)),
                                        lambda idx: padded[idx])

  def _join(self, x):
    """Device blocks of class centres -> the host's whole [D, C]."""
    shards = self.class_shards
    if self.kind == "pmap":
      return sharded_head.join_host(np.asarray(x), shards)
    if not x.is_fully_addressable:
      # pylint: disable-next=g-import-not-at-top
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)[:, :shards.num_classes]

  def state_sharding(self, state):
    """shard_map: the NamedSharding of every leaf of a state as `replicate` places it
    (to build or lower a state without going through the host)."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self._state_specs(state),
                        is_leaf=lambda x: isinstance(x, P))

  def _state_specs(self, state):
    """shard_map specs of a state: P(None, AXIS) for class centres, P() for the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: P(None, AXIS) if self._sharded(p, x) else P(), state)

  def shard(self, batch):
    """Host batch of [local_devices, per_device, ...] arrays -> device arrays."""
    def put(x):
      if x.shape[0] != self.local_device_count:
        raise ValueError(f"batch leading axis {x.shape[0]} != local devices "
                         f"{self.local_device_count}")
      if self.kind == "pmap":
        return jax.device_put(x, self._local_split)
      return jax.make_array_from_process_local_data(
          NamedSharding(self.mesh, P(AXIS)), x, (self.device_count,) + x.shape[1:])
    return jax.tree.map(put, batch)

  def wrap(self, step_fn: Callable, *, donate_state: bool = True) -> Callable:
    """Maps `step_fn(state, batch, *replicated) -> (state, metrics)` over devices.

    `state` and the extra arguments (an rng, frozen teacher parameters, ...) must come from
    `replicate`; `batch` from `shard`. Returned state and metrics stay replicated.
    """
    donate = (0,) if donate_state else ()
    if self.kind == "pmap":
      return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=donate,
                      devices=self._pmap_devices)

    def per_device(state, batch, *rest):
      # shard_map hands each device a [1, per_device, ...] block of the batch.
      return step_fn(state, jax.tree.map(lambda x: x[0], batch), *rest)

    @functools.wraps(step_fn)
    def mapped(state, batch, *rest):
      state_specs = self._state_specs(state) if self.class_shards is not None else P()
      specs = (state_specs, P(AXIS)) + (P(),) * len(rest)
      out_specs = (state_specs, P()) if self.class_shards is not None else P()
      # check_vma=False gives pmap's semantics: each device differentiates its own copy
      # of the replicated state (no implicit psum of gradients; the step's pmean averages
      # them), and the psums inside synchronized BatchNorm transpose to psums.
      return jax.shard_map(per_device, mesh=self.mesh, in_specs=specs, out_specs=out_specs,
                           check_vma=False)(state, batch, *rest)
    return jax.jit(mapped, donate_argnums=donate)

  def wrap_apply(self, apply_fn: Callable) -> Callable:
    """Maps an inference function `apply_fn(replicated, batch) -> outputs` over devices.

    No collectives inside; outputs keep the batch layout [devices, per_device, ...]; read
    them on the host with `fetch`.
    """
    if self.kind == "pmap":
      return jax.pmap(apply_fn, axis_name=AXIS, devices=self._pmap_devices)

    def per_device(replicated, batch):
      out = apply_fn(replicated, jax.tree.map(lambda x: x[0], batch))
      return jax.tree.map(lambda y: y[None], out)
    return jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=P(AXIS)))

  def fetch(self, tree) -> Any:
    """Per-device outputs of `wrap_apply` -> host numpy [local_devices, per_device, ...]."""
    if self.kind == "pmap":
      return jax.tree.map(np.asarray, tree)
    return jax.tree.map(
        lambda x: np.concatenate([np.asarray(s.data) for s in sorted(
            x.addressable_shards, key=lambda s: s.index[0].start or 0)]), tree)


def gather_hosts(rows: np.ndarray) -> np.ndarray:
  """Every process's host array of rows, concatenated in process order (same shapes).

  On a single process, `rows` itself.
  """
  if jax.process_count() == 1:
    return rows
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(rows), tiled=True))


def first_process_on_host() -> bool:
  """Whether this process has the lowest index of the processes on its machine (by host
  name): one writer per machine for files on its local disk. Every process must call it
  (a gather); True on a single process."""
  if jax.process_count() == 1:
    return True
  import hashlib  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:4], "little")
  hosts = gather_hosts(np.array([host], np.uint32))
  return int(np.flatnonzero(hosts == host)[0]) == jax.process_index()


def broadcast_from_main(value):
  """Process 0's value of a numpy scalar or array, on every process."""
  if jax.process_count() == 1:
    return value
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def sync_hosts(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on a single process).

  Used after process 0 writes files that the other processes read next.
  """
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@functools.lru_cache(maxsize=None)
def get(kind: str, num_devices: int = 0) -> DataParallel:
  """One DataParallel per setting, so compiled functions cached on it are reused."""
  return DataParallel(kind, num_devices)
