"""The tf.data training input: deterministic, resumable, epoch permutations, host shards."""

import jax
import numpy as np
import pytest

from mstkd_jax.data import input_pipeline
from mstkd_jax.train import steps
import numerics
from mstkd_jax.errors import UserError

N, SIZE = 40, 16


@pytest.fixture(scope="module")
def arrays():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
  return {"image": images, "label": np.arange(N, dtype=np.int32) * 10}


def _batches(arrays, start=0, total=8, **kwargs):
  settings = dict(global_batch=8, steps_per_epoch=5, seed=3, start_step=start,
                  total_steps=total, local_device_count=2, process_index=0, process_count=1)
  settings.update(kwargs)
  return list(input_pipeline.train_batches(arrays, **settings))


def test_shapes_and_flipped_pixels(arrays):
  batch = _batches(arrays, total=1)[0]
  assert batch["image"].shape == (2, 4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (2, 4) and batch["index"].shape == (2, 4)
  index, flips = batch["index"].reshape(-1), batch["flip"].reshape(-1)
  expected = arrays["image"][index].copy()
  expected[flips] = expected[flips][:, :, ::-1]
  np.testing.assert_array_equal(batch["image"].reshape(-1, SIZE, SIZE, 3), expected)
  np.testing.assert_array_equal(batch["label"].reshape(-1), arrays["label"][index])


def test_the_steps_normalize_pixels_on_the_device_as_the_host_does():
  pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=-1)
  want = (pixels.astype(np.float32) / 255 - 0.5) / 0.5     # insightface's normalization
  on_device = np.asarray(jax.jit(steps.network_input)(pixels))
  assert on_device.dtype == np.float32
  np.testing.assert_array_equal(on_device, want)           # to the bit
  np.testing.assert_array_equal(on_device, input_pipeline.normalize_images(pixels))
  # Off CPUs it is computed, not looked up: x / 255 in [0, 1] may come out as x * (1/255),
  # two roundings (of 1/255, of the product) of at most an ulp of 1.0 each; - 0.5 adds at
  # most half an ulp, and / 0.5 doubles it all.
  computed = np.asarray(jax.jit(steps.computed_pixels)(pixels))
  np.testing.assert_allclose(computed, want, rtol=0, atol=2 * 2.5 * numerics.EPS32)
  floats = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 2, 2, 3)
  assert steps.network_input(floats) is floats             # already normalized: as it is


def test_each_epoch_is_a_permutation_and_epochs_differ(arrays):
  batches = _batches(arrays, total=10)
  epochs = [np.concatenate([b["index"].reshape(-1) for b in batches[e * 5:(e + 1) * 5]])
            for e in range(2)]
  for order in epochs:
    assert sorted(order) == list(range(N))
  assert not np.array_equal(epochs[0], epochs[1])


def test_deterministic_and_resumable(arrays):
  full = _batches(arrays, total=8)
  again = _batches(arrays, total=8)
  resumed = _batches(arrays, start=5, total=8)
  for a, b in zip(full, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(full[5:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = _batches(arrays, total=1, seed=4)[0]
  assert not np.array_equal(other_seed["index"], full[0]["index"])


def test_hosts_split_each_global_batch(arrays):
  single = _batches(arrays, total=3, local_device_count=1)
  hosts = [_batches(arrays, total=3, local_device_count=1, process_index=p, process_count=2)
           for p in range(2)]
  for step in range(3):
    for key in ("index", "flip", "image"):
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]], axis=1)
      np.testing.assert_array_equal(joined, single[step][key])


def test_flips_are_about_half_and_can_be_off(arrays):
  flips = np.concatenate([b["flip"].reshape(-1) for b in _batches(arrays, total=50,
                                                                     steps_per_epoch=5)])
  assert 0.4 < flips.mean() < 0.6
  assert not any(b["flip"].any() for b in _batches(arrays, total=5, flip=False))


def test_batch_not_divisible_by_devices_is_refused(arrays):
  with pytest.raises(UserError, match="train.batch_size=8 must be divisible"):
    _batches(arrays, local_device_count=3)


def test_eval_batches_pad_the_last_batch(arrays):
  out = list(input_pipeline.eval_batches(arrays["image"][:7], batch_size=4,
                                         local_device_count=2))
  assert [count for _, count in out] == [4, 3]
  assert out[1][0]["image"].shape == (2, 2, SIZE, SIZE, 3)
  np.testing.assert_allclose(out[1][0]["image"].reshape(-1, SIZE, SIZE, 3)[:3],
                             input_pipeline.normalize_images(arrays["image"][4:7]))


def test_oriented_arrays_follow_each_example_s_flip(arrays, tmp_path):
  plain = np.arange(N, dtype=np.float32)
  per_orientation = np.stack([plain, -plain], axis=1)[:, :, None]      # [N, 2, 1]
  np.save(tmp_path / "target.npy", per_orientation)
  mapped = np.load(tmp_path / "target.npy", mmap_mode="r")
  for batch in _batches(arrays, total=3):
    batch = input_pipeline.add_oriented(batch, {"target": mapped})
    assert type(batch["target"]) is np.ndarray  # read out of the file, not a view of it
    assert batch["target"].shape == batch["index"].shape + (1,)
    index, flips = batch["index"].reshape(-1), batch["flip"].reshape(-1)
    assert flips.any() and not flips.all()
    np.testing.assert_array_equal(batch["target"].reshape(-1),
                                  np.where(flips, -plain[index], plain[index]))
    stored = input_pipeline.add_oriented(dict(batch), {"target": mapped}, "stored")
    np.testing.assert_array_equal(stored["target"].reshape(-1), plain[index])
  with pytest.raises(ValueError, match="orientation must be one of"):
    input_pipeline.add_oriented(batch, {"target": mapped}, "mirrored")


_PIPELINE_DIGEST = """
import hashlib
import numpy as np
from mstkd_jax.data import input_pipeline
import tensorflow as tf
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (64, 24, 24, 3), dtype=np.uint8)
digest = hashlib.sha256()
for batch in input_pipeline.train_batches(
    {"image": images}, global_batch=16, steps_per_epoch=4, seed=3, start_step=0,
    total_steps=8, local_device_count=2, process_index=0, process_count=1):
  digest.update(batch["image"].tobytes())
digest.update(tf.io.decode_jpeg(tf.io.encode_jpeg(images[0])).numpy().tobytes())
print(digest.hexdigest())
"""


def test_input_batches_are_the_same_bits_with_tensorflows_onednn_on_or_off():
  """mstkd_jax turns TensorFlow's oneDNN kernels off (mstkd_jax/__init__.py), which newer
  CPUs get by default, and the README says nothing we compute goes through them: the
  training batches and a JPEG decode are the same bits either way."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digests = []
  for onednn in ("0", "1"):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", _PIPELINE_DIGEST], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    digests.append(done.stdout.split()[-1])
  assert digests[0] == digests[1]
