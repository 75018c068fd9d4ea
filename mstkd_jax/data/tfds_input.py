"""Prepared (TFDS) face data for the stages: labels, the training stream, verification sets.

Data sets come from `python -m mstkd_jax.formats.prepare` (formats/tfds_builders.py: the layout);
data.prepared finds their folders and reads their metadata and labels.

* load_face_dataset: identity/group label arrays (from labels.npz, no image is read) and
  the names, plus the random-access data source of the array_record records.
* train_batches: the same stream as input_pipeline.train_batches over the chosen rows:
  step t's global batch is positions [s*G, (s+1)*G) of epoch e = t // steps_per_epoch
  (s = t % steps_per_epoch) permuted by index_shuffle keyed by (seed, e), its flips drawn
  by (seed, t); host p reads only its rows [p*L, (p+1)*L) of that batch from the
  array_record files, and tf.data decodes them (in parallel, in order). So a run resumed
  at any step sees what an uninterrupted run sees.
* load_verification_sets: each group's distinct images decoded once, with its pairs.

Stored images of another size than the model's are resized with formats/faces.py's resizer
(Pillow's antialiased bilinear), the one evaluate, embed and prepare use, with one warning.

TensorFlow is kept off the GPUs (set_visible_devices) the first time it is used here, so
that tf.data does not take accelerator memory from JAX.
"""

import dataclasses
import functools
import os
from typing import Iterator, Sequence

import numpy as np

from mstkd_jax import errors, paths
from mstkd_jax.data import input_pipeline, prepared
from mstkd_jax.formats import faces
from mstkd_jax.data.pairs import VerificationSet
from mstkd_jax.errors import UserError

ImageSize = int | Sequence[int]
_WARNED_RESIZE: set = set()


@functools.lru_cache(maxsize=None)
def _tf():
  """Imports TensorFlow and hides the GPUs from it (once)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # Devices already initialized: leave them.
    pass
  return tf


def _tfds():
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _hw(image_size: ImageSize) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = (int(v) for v in image_size)
  return h, w


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsFaceSet:
  """A prepared training set: labels in memory, images read on demand.

  Attributes:
    name: the data set name.
    path: its prepared folder (<data_dir>/mstkd_faces/<name>/<version>).
    identity: int32 [N] identity label of every record.
    group: int32 [N] group index of every record (-1 without groups).
    group_names: group names; group g is group_names[g].
    identity_names: name of every identity label.
    identity_group: int32 [num_identities] group of every identity label.
    image_sizes: the distinct (height, width) of the stored images.
  """
  name: str
  path: str
  identity: np.ndarray
  group: np.ndarray
  group_names: tuple[str, ...]
  identity_names: tuple[str, ...]
  identity_group: np.ndarray
  image_sizes: tuple[tuple[int, int], ...]

  @property
  def num_examples(self) -> int:
    return len(self.identity)

  @property
  def num_identities(self) -> int:
    return len(self.identity_names)

  def identity_groups(self) -> np.ndarray:
    """int32 [num_identities]: the group of every identity (as sources.TrainingSet)."""
    return self.identity_group

  @functools.cached_property
  def builder(self):
    """The TFDS builder of the prepared folder (read-only)."""
    return prepared.open_builder(self.path)

  def raw_source(self):
    """Random access to the serialized records of split "train" (tfds data source)."""
    return _raw_source(self.builder, "train")


def _raw_source(builder, split: str):
  """Random access to the serialized records of `split`, as raw bytes."""
  tfds = _tfds()
  return builder.as_data_source(split,
                                deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def _record_labels(raw: bytes) -> tuple[int, int]:
  tf = _tf()
  feature = tf.train.Example.FromString(raw).features.feature
  return int(feature["identity"].int64_list.value[0]), int(feature["group"].int64_list.value[0])


def load_face_dataset(name: str, data_dir: str) -> TfdsFaceSet:
  """Loads a prepared training set's labels and names; reads no image.

  Args:
    name: the data set name given to prepare (--name).
    data_dir: the TFDS data dir given to prepare (--data_dir).
  Raises:
    UserError: not prepared, or its files disagree with each other.
  """
  data_dir = paths.local(data_dir, "data.data_dir")
  path = prepared.find_prepared(data_dir, name, prepared.TRAINING)
  prepared.check_files(path, "train")
  meta = prepared.read_metadata(path)
  face_set = TfdsFaceSet(
      name=name, path=path, identity=np.zeros(0, np.int32), group=np.zeros(0, np.int32),
      group_names=tuple(meta["group_names"]), identity_names=tuple(meta["identity_names"]),
      identity_group=np.asarray(meta["identity_groups"], np.int32).reshape(-1),
      image_sizes=tuple(tuple(int(v) for v in s) for s in meta["image_sizes"]))
  num_examples = face_set.builder.info.splits["train"].num_examples
  identity, group = prepared.read_labels(path, num_examples)
  bad = (identity < 0) | (identity >= face_set.num_identities)
  if bad.any() or (group != face_set.identity_group[np.clip(identity, 0, None)]).any():
    raise UserError(f"{os.path.join(path, prepared.LABELS_FILE)}: labels outside the "
                    f"{face_set.num_identities} identities of metadata.json, or groups that "
                    "disagree with their identity's; expected the files of one preparation")
  face_set = dataclasses.replace(face_set, identity=identity, group=group)
  if num_examples:
    # Records must be in label-file order: check a few (first, middle, last).
    rows = sorted({0, num_examples // 2, num_examples - 1})
    records = prepared.read_records(face_set.raw_source(), rows, path, "train")
    for row, raw in zip(rows, records):
      if _record_labels(raw) != (int(identity[row]), int(group[row])):
        raise UserError(f"{path}: record {row} has labels {_record_labels(raw)} but "
                        f"{prepared.LABELS_FILE} says {(int(identity[row]), int(group[row]))}; "
                        "expected the files of one preparation")
  return face_set


def _needs_resize(sizes: Sequence[tuple[int, int]], target: tuple[int, int],
                  where: str) -> bool:
  """Whether stored images must be resized; warns once per (data set, size)."""
  other = sorted(set(tuple(s) for s in sizes) - {target})
  if not other:
    return False
  if (where, target) not in _WARNED_RESIZE:
    _WARNED_RESIZE.add((where, target))
    errors.warn(f"{where}: stored images of size(s) {other} (height, width) differ from the "
                f"requested {target}; they are resized with {faces.RESAMPLING} while "
                "loading. Prepare the data at the model's size (python -m "
                f"mstkd_jax.formats.prepare ... --image_size={target[0]}) to avoid this.")
  return True


def _image_decoder(features, size: tuple[int, int], resize: bool):
  """Returns f(serialized record) -> (uint8 image [H, W, 3], example); images of another
  size are resized by faces.resize_image (in a tf.numpy_function)."""
  tf = _tf()
  tfds = _tfds()
  h, w = size

  def decode(serialized):
    example = features.deserialize_example(
        serialized, decoders={"image": tfds.decode.SkipDecoding()})
    data = example["image"]
    # ISLOW DCT: bit-identical to PIL/libjpeg defaults (TF's default IFAST is off by a few
    # levels), so these images equal what images.decode_image gives.
    image = tf.cond(tf.io.is_jpeg(data),
                    lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                    lambda: tf.io.decode_png(data, channels=3))
    if resize:
      shape = tf.shape(image)
      image = tf.cond(
          tf.logical_and(tf.equal(shape[0], h), tf.equal(shape[1], w)), lambda: image,
          lambda: tf.numpy_function(lambda x: faces.resize_image(x, (h, w)), [image],
                                    tf.uint8, stateful=False))
    image = tf.ensure_shape(image, [h, w, 3])
    return image, example

  return decode


def _fetcher(source, count: int | None, path: str, split: str):
  """tf function: int64 [count] record numbers -> their serialized records, tf.string [count].

  `source` is a TFDS data source returning raw bytes (of `split` of the prepared folder
  `path`); its reads run in Python, so the function holds the GIL while it gathers the
  bytes (decoding is left to TF ops).
  """
  tf = _tf()

  def read(rows):
    return np.asarray(prepared.read_records(source, [int(r) for r in rows], path, split),
                      dtype=object)

  def fetch(rows):
    raw = tf.numpy_function(read, [rows], tf.string, stateful=False)
    raw.set_shape([count])
    return raw

  return fetch


def train_batches(face_set: TfdsFaceSet, rows: np.ndarray, labels: np.ndarray, *,
                  global_batch: int, steps_per_epoch: int, seed: int, start_step: int,
                  total_steps: int, image_size: ImageSize,
                  local_device_count: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  flip: bool = True) -> Iterator[dict]:
  """Yields host batches for steps start_step .. total_steps - 1 (as input_pipeline's).

  Args:
    face_set: from load_face_dataset.
    rows: int64 [M] records to train on (a group, an identity subset, or all).
    labels: int32 [M] the label fed for each of those rows.
    global_batch: examples per step over all hosts and devices.
    steps_per_epoch: steps in one pass; steps_per_epoch * global_batch <= M.
    seed: data seed.
    start_step, total_steps: the steps to produce.
    image_size: model input size, an int or (height, width); stored images of another
      size are resized (with a warning, once).
    local_device_count, process_index, process_count: default to this JAX process's.
    flip: random horizontal flips with probability 0.5.
  Yields:
    {"image": uint8 [D, B, H, W, 3] (normalized on the device by the steps), "label":
     int32 [D, B], "index": int32 [D, B] the record (dataset row) fed, "flip": bool
     [D, B]}: D local devices, B per
    device. "index" is rows[j] for the position j that input_pipeline.train_batches over
    {"image": images[rows], "label": labels} would report as its "index".
  """
  import jax  # pylint: disable=g-import-not-at-top
  tf = _tf()

  local_device_count = local_device_count or jax.local_device_count()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  input_pipeline.check_batch_split(global_batch, local_device_count * process_count,
                                   process_count)
  rows = np.asarray(rows, np.int64).reshape(-1)
  labels = np.asarray(labels, np.int32).reshape(-1)
  num_examples = len(rows)
  if len(labels) != num_examples:
    raise ValueError(f"{num_examples} rows but {len(labels)} labels")
  if num_examples and (rows.min() < 0 or rows.max() >= face_set.num_examples):
    raise ValueError(f"rows must lie in [0, {face_set.num_examples}); got "
                     f"{rows.min()}..{rows.max()}")
  if steps_per_epoch * global_batch > num_examples:
    raise ValueError(f"{steps_per_epoch} steps of {global_batch} exceed {num_examples} examples")
  host_batch = global_batch // process_count
  per_device = host_batch // local_device_count
  size = _hw(image_size)
  resize = _needs_resize(face_set.image_sizes, size, face_set.path)
  decode = _image_decoder(face_set.builder.info.features, size, resize)
  fetch = _fetcher(face_set.raw_source(), host_batch, face_set.path, "train")
  rows_t = tf.constant(rows)
  labels_t = tf.constant(labels)

  def plan(step):
    # The same plan as input_pipeline.train_batches.
    position, flips = input_pipeline.plan_step(
        tf, step, seed=seed, steps_per_epoch=steps_per_epoch, global_batch=global_batch,
        num_examples=num_examples, process_index=process_index, host_batch=host_batch,
        flip=flip)
    row = tf.gather(rows_t, position)
    return {"raw": fetch(row), "index": tf.cast(row, tf.int32),
            "label": tf.gather(labels_t, position), "flip": flips}

  def one_image(example):
    # The pixels extraction sees too (ordered_images), so cached targets match.
    image, _ = decode(example.pop("raw"))
    image = tf.where(example["flip"], tf.reverse(image, axis=[1]), image)
    example["image"] = image        # uint8: the steps normalize it (PIXEL_VALUES)
    return example

  def to_devices(batch):
    return {k: tf.reshape(v, [local_device_count, per_device] + v.shape[1:].as_list())
            for k, v in batch.items()}

  plan = tf.autograph.experimental.do_not_convert(plan)
  one_image = tf.autograph.experimental.do_not_convert(one_image)
  to_devices = tf.autograph.experimental.do_not_convert(to_devices)
  ds = tf.data.Dataset.range(start_step, max(start_step, total_steps))
  # Reading is I/O (the data source reads each shard's records in threads).
  ds = ds.map(plan, num_parallel_calls=4, deterministic=True)
  ds = ds.unbatch()
  ds = ds.map(one_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  ds = ds.map(to_devices)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return prepared.one_line_errors(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())


def ordered_images(face_set: TfdsFaceSet, image_size: ImageSize,
                   chunk: int = 512, rows=None) -> Iterator[np.ndarray]:
  """Every record's image in record order (or those of `rows`, int64 [M], in that order),
  uint8 [<= chunk, H, W, 3] at a time (extraction)."""
  tf = _tf()
  size = _hw(image_size)
  resize = _needs_resize(face_set.image_sizes, size, face_set.path)
  decode = _image_decoder(face_set.builder.info.features, size, resize)
  fetch = _fetcher(face_set.raw_source(), None, face_set.path, "train")

  def one_image(raw):
    return decode(raw)[0]

  ds = (tf.data.Dataset.range(face_set.num_examples) if rows is None
        else tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64))).batch(chunk)
  ds = ds.map(tf.autograph.experimental.do_not_convert(fetch))  # sequential: in order
  ds = ds.unbatch().map(tf.autograph.experimental.do_not_convert(one_image),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return prepared.one_line_errors(ds.batch(chunk).prefetch(2).as_numpy_iterator())


def load_verification_sets(name: str, data_dir: str, image_size: ImageSize
                           ) -> dict[str, VerificationSet]:
  """Loads every group of a prepared verification set.

  Args:
    name: the data set name given to prepare.
    data_dir: the TFDS data dir given to prepare.
    image_size: int or (height, width); stored images of another size are resized by
      faces.resize_image (with a warning, once): the pixels `evaluate` gives them.
  Returns:
    {group: VerificationSet(images uint8 [M, H, W, 3], pairs int32 [P, 2] rows into
    images, issame bool [P])}, pairs in the source's order.
  Raises:
    UserError: not prepared, or its files disagree with each other.
  """
  tf = _tf()
  data_dir = paths.local(data_dir, "data.data_dir")
  path = prepared.find_prepared(data_dir, name, prepared.VERIFICATION)
  prepared.check_files(path, "test")
  meta = prepared.read_metadata(path)
  builder = prepared.open_builder(path)
  source = _raw_source(builder, "test")
  size = _hw(image_size)
  decode = _image_decoder(builder.info.features, size,
                          _needs_resize(meta["image_sizes"], size, path))

  def one_image(serialized):
    image, example = decode(serialized)
    return image, example["group"], example["index"]

  chunk = 256
  ds = tf.data.Dataset.range(len(source)).batch(chunk)
  ds = ds.map(_fetcher(source, None, path, "test"))
  ds = ds.unbatch().map(one_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images, groups, index = [], [], []
  for image, g, i in prepared.one_line_errors(ds.batch(chunk).as_numpy_iterator()):
    images.append(image)
    groups.append(g)
    index.append(i)
  images = np.concatenate(images) if images else np.zeros((0,) + size + (3,), np.uint8)
  groups = np.concatenate(groups) if groups else np.zeros(0, np.int32)
  index = np.concatenate(index) if index else np.zeros(0, np.int32)
  out = {}
  for g, group in enumerate(meta["group_names"]):
    sel = np.flatnonzero(groups == g)
    order = np.argsort(index[sel], kind="stable")
    if not np.array_equal(index[sel][order], np.arange(len(sel))):
      raise UserError(f"{path}: the images of group {group!r} are not rows 0..{len(sel) - 1}; "
                      "expected the files of one preparation")
    table = meta["pair_table"][group]
    pairs = np.stack([np.asarray(table["index_a"], np.int32),
                      np.asarray(table["index_b"], np.int32)], axis=1).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= len(sel)):
      raise UserError(f"{os.path.join(path, prepared.METADATA_FILE)}: pairs of group {group!r} "
                      f"name image rows outside [0, {len(sel)})")
    out[group] = VerificationSet(images[sel[order]], pairs, np.asarray(table["issame"], bool))
  return out

