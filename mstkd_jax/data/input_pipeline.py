"""tf.data training input: seeded shuffle, random horizontal flip, [-1, 1] images, per-host shard.

The batch of step t is a pure function of (seed, t): epoch e = t // steps_per_epoch is
shuffled with a stateless index permutation keyed by (seed, e), and each example's flip by
(seed, t). So a run resumed at any step sees exactly the batches an uninterrupted run sees,
whatever the number of hosts or devices: host p takes rows [p*L, (p+1)*L) of each global
batch and reshapes them to [local_devices, per_device, ...].
Each batch also carries "index" (the dataset row) and "flip" (whether the image fed was
mirrored), so cached per-image data (teacher embeddings, targets) can be looked up for
exactly the orientation the model sees (`add_oriented`), from arrays that may be
memory-mapped files larger than memory.
"""

import os
from typing import Iterator, Mapping

import jax
import numpy as np

from mstkd_jax.errors import UserError


def normalize_images(images):
  """uint8 RGB -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, as insightface."""
  return (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5


# What normalize_images makes of each pixel value, float32 [256]: training batches carry
# uint8 pixels (a quarter of float32's bytes from host to device), and a step compiled for
# a CPU looks them up here (train/steps.network_input): the host's numbers to the bit
# (XLA:CPU turns x / 255 into x * (1 / 255), which rounds differently).
PIXEL_VALUES = normalize_images(np.arange(256, dtype=np.uint8))


def check_batch_split(global_batch: int, device_count: int, process_count: int,
                      field: str = "train.batch_size") -> None:
  """Refuses a global batch that is not a positive integer or does not split evenly over
  the devices and hosts (UserError naming the config `field`)."""
  if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
    raise UserError(f"config field {field}={global_batch!r}: expected a positive integer "
                    "(the global batch, over all hosts and devices)")
  if global_batch % device_count or global_batch % process_count:
    raise UserError(f"{field}={global_batch} must be divisible by the number of "
                    f"devices ({device_count}) and of hosts ({process_count})")


def plan_step(tf, step, *, seed, steps_per_epoch: int, global_batch: int, num_examples: int,
              process_index: int, host_batch: int, flip: bool):
  """This host's share of step `step` (tf ops): (positions [L] in the example list, flips [L]).

  Epoch e = step // steps_per_epoch is the permutation index_shuffle keyed by (seed, e);
  the step takes positions [s * global_batch, (s + 1) * global_batch) of it, host p the
  rows [p * L, (p + 1) * L); flips are drawn for the whole global batch keyed by
  (seed + 1, step), so neither depends on the number of hosts.
  """
  seed = np.int64(seed)
  epoch = step // steps_per_epoch
  positions = ((step % steps_per_epoch) * global_batch + process_index * host_batch
               + tf.range(host_batch, dtype=tf.int64))
  index = tf.random.experimental.index_shuffle(
      positions, seed=tf.stack([seed, epoch]), max_index=num_examples - 1)
  flips = tf.random.stateless_uniform([global_batch], seed=tf.stack([seed + 1, step])) < 0.5
  flips = flips[process_index * host_batch:(process_index + 1) * host_batch]
  if not flip:
    flips = tf.zeros_like(flips)
  return index, flips


def train_batches(arrays: Mapping[str, np.ndarray], *, global_batch: int,
                  steps_per_epoch: int, seed: int, start_step: int, total_steps: int,
                  local_device_count: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, flip: bool = True) -> Iterator[dict]:
  """Yields host batches for steps start_step .. total_steps - 1.

  Args:
    arrays: per-example arrays with a common first axis; "image" (uint8 [N, H, W, 3]), if
      present, is flipped, the others (labels, ...) are gathered as they are.
    global_batch: examples per step over all hosts and devices.
    steps_per_epoch: steps in one pass; must satisfy steps_per_epoch * global_batch <= N.
    seed: data seed.
    start_step, total_steps: the steps to produce.
    local_device_count, process_index, process_count: default to this JAX process's.
    flip: random horizontal flips with probability 0.5 (drawn also when no "image" is fed,
      for `add_oriented`).
  Yields:
    {"image": uint8 [D, B, H, W, 3] (flipped; the steps normalize it on the device with
     PIXEL_VALUES), <other arrays> [D, B, ...], "index": int32 [D, B], "flip": bool [D, B]}
     with D local devices and B per-device examples.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  local_device_count = local_device_count or jax.local_device_count()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  check_batch_split(global_batch, local_device_count * process_count, process_count)
  num_examples = len(next(iter(arrays.values())))
  if steps_per_epoch * global_batch > num_examples:
    raise ValueError(f"{steps_per_epoch} steps of {global_batch} exceed {num_examples} examples")
  host_batch = global_batch // process_count
  per_device = host_batch // local_device_count
  tensors = {k: tf.constant(v) for k, v in arrays.items()}

  def make_batch(step):
    index, flips = plan_step(tf, step, seed=seed, steps_per_epoch=steps_per_epoch,
                             global_batch=global_batch, num_examples=num_examples,
                             process_index=process_index, host_batch=host_batch, flip=flip)
    out = {k: tf.gather(v, index) for k, v in tensors.items()}
    if "image" in out:
      images = out["image"]
      out["image"] = tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)
    out["index"] = tf.cast(index, tf.int32)
    out["flip"] = flips
    return {k: tf.reshape(v, [local_device_count, per_device] + v.shape[1:].as_list())
            for k, v in out.items()}

  make_batch = tf.autograph.experimental.do_not_convert(make_batch)
  ds = tf.data.Dataset.range(start_step, total_steps)
  # A fixed, private pool without autotuning: on a 2-core host the autotuned shared pool
  # starved next to XLA's threads and stalled the last batches of a stage for 2-27 s.
  threads = max(2, (os.cpu_count() or 2) // 2)
  ds = ds.map(make_batch, num_parallel_calls=threads, deterministic=True)
  options = tf.data.Options()
  options.autotune.enabled = False
  options.threading.private_threadpool_size = threads
  return ds.prefetch(2).with_options(options).as_numpy_iterator()


# Which entry of per-image [N, 2, ...] data an example gets: "as_fed", that of the
# orientation it is fed in (image or mirror); "stored", always the stored image's, whatever
# the flip (as the authors' released scripts, which cache one orientation only).
ORIENTATIONS = ("as_fed", "stored")


def check_orientation(value: str, field: str) -> str:
  """`value` if it is one of ORIENTATIONS; else a UserError naming the config `field`."""
  if value not in ORIENTATIONS:
    raise UserError(f"config field {field}={value!r}: expected one of {ORIENTATIONS}")
  return value


def add_oriented(batch: dict, arrays: Mapping[str, np.ndarray],
                 orientation: str = "as_fed") -> dict:
  """Adds arrays[key][index, flip] to a host batch for every key, in place; returns it.

  Each array is shaped [N, 2, ...]: per-record data for the image as stored ([:, 0]) and
  mirrored ([:, 1]), e.g. teacher embeddings or cached targets; every example gets the
  entry of its record ("index") in the orientation it is fed ("flip"), or with
  orientation="stored" the stored image's entry. Arrays may be memory-mapped
  (np.load(..., mmap_mode="r")): only the rows of the batch are read.
  """
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
  index = batch["index"].astype(np.int64)
  flips = batch["flip"].astype(np.int64) if orientation == "as_fed" else np.zeros_like(index)
  for key, values in arrays.items():
    batch[key] = np.asarray(values[index, flips])
  return batch


def eval_batches(images: np.ndarray, *, batch_size: int,
                 local_device_count: int | None = None) -> Iterator[tuple[dict, int]]:
  """In-order batches [D, B, H, W, 3] of normalized images, the last one zero-padded.

  Yields (batch, number of real examples in it).
  """
  local_device_count = local_device_count or jax.local_device_count()
  per_device = max(1, -(-batch_size // local_device_count))
  chunk = per_device * local_device_count
  for start in range(0, len(images), chunk):
    part = normalize_images(images[start:start + chunk])
    count = len(part)
    if count < chunk:
      part = np.concatenate([part, np.zeros((chunk - count,) + part.shape[1:], part.dtype)])
    yield {"image": part.reshape((local_device_count, per_device) + part.shape[1:])}, count
