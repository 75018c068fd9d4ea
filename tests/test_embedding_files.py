"""The extraction and adaptor stages' per-image arrays: written in chunks, read memory-mapped."""

import os
import tracemalloc

import jax
import numpy as np
import pytest

from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.stages import adaptor as adaptor_stage, extract
from mstkd_jax.train import parallel as parallel_lib
from mstkd_jax.train import build
from mstkd_jax import files

SIZE, EMBEDDING = 16, 8


def test_npy_writer_replaces_the_file_only_when_complete(tmp_path):
  path = str(tmp_path / "a.npy")
  with files.npy_writer(path, (5, 2)) as out:
    out[:] = np.arange(10).reshape(5, 2)
  np.testing.assert_array_equal(np.load(path), np.arange(10).reshape(5, 2))

  with pytest.raises(RuntimeError, match="stop"):
    with files.npy_writer(path, (7, 3)) as out:
      out[:3] = 1.0
      raise RuntimeError("stop")
  # The earlier file is intact and no partial file is left behind.
  np.testing.assert_array_equal(np.load(path), np.arange(10).reshape(5, 2))
  assert sorted(os.listdir(tmp_path)) == ["a.npy"]

  with files.npy_writer(str(tmp_path / "b.npy"), (3,), enabled=False) as out:
    assert out is None
  assert not (tmp_path / "b.npy").exists()


class _Images:
  """A training set reduced to what the extraction reads: images in record order."""

  def __init__(self, images, count=None):
    self.images, self.num_examples = images, len(images) if count is None else count

  def image_chunks(self, chunk):
    for start in range(0, len(self.images), chunk):
      yield self.images[start:start + chunk]


def _teacher(seed):
  module = models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=4,
                         embedding_size=EMBEDDING, axis_name=parallel_lib.AXIS)
  variables = build.init_variables(module, jax.random.PRNGKey(seed),
                                     np.zeros((1, SIZE, SIZE, 3), np.float32), train=False)
  return module, variables


def test_extraction_fills_each_teacher_s_slice_of_the_file(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
  parallel = parallel_lib.get("pmap", 1)
  path = str(tmp_path / "teacher_embeddings.npy")
  teachers = [_teacher(seed) for seed in (1, 2)]
  with files.npy_writer(path, (10, 2, 2, EMBEDDING)) as out:
    for i, (module, variables) in enumerate(teachers):
      extract._embed_training_set(variables, module, _Images(images), parallel, 4, out, i)  # pylint: disable=protected-access
  written = np.load(path, mmap_mode="r")
  for i, (module, variables) in enumerate(teachers):
    whole = extract._normalized_pair(variables, module, images, parallel, 4)  # pylint: disable=protected-access
    np.testing.assert_allclose(written[:, :, i], whole, rtol=1e-6, atol=1e-7)
  assert not np.allclose(written[:, :, 0], written[:, :, 1])

  module, variables = teachers[0]
  with pytest.raises(UserError, match="gave 10 images while its labels count 12"):
    extract._embed_training_set(variables, module, _Images(images, count=12), parallel, 4,  # pylint: disable=protected-access
                                None, 0)


def test_extracted_embeddings_are_read_memory_mapped_and_bad_files_named(tmp_path):
  train = np.random.default_rng(0).normal(size=(6, 2, 3, 4)).astype(np.float32)
  np.save(tmp_path / "teacher_embeddings.npy", train)
  files.save_npz(str(tmp_path / "verification_teacher_embeddings.npz"),
                          {"g/embeddings": train[:4], "g/issame": np.array([True, False])})
  loaded, verification = extract.load({}, str(tmp_path))
  assert isinstance(loaded, np.memmap)
  np.testing.assert_array_equal(loaded, train)
  np.testing.assert_array_equal(verification["g"][0], train[:4])

  # With cache_dir the memory-mapped file is looked for there (mirroring the stage folder),
  # else in the stage folder (a stage run before cache_dir was set); the .npz is always
  # next to the stage's other outputs.
  config = {"cache_dir": str(tmp_path / "cache")}
  np.testing.assert_array_equal(extract.load(config, str(tmp_path))[0], train)
  mirror = tmp_path / "cache" / str(tmp_path).lstrip("/")
  mirror.mkdir(parents=True)
  (tmp_path / "teacher_embeddings.npy").rename(mirror / "teacher_embeddings.npy")
  loaded = extract.load(config, str(tmp_path))[0]
  assert loaded.filename == str(mirror / "teacher_embeddings.npy")
  np.testing.assert_array_equal(loaded, train)
  with pytest.raises(UserError, match="cannot read the teacher embeddings in"):
    extract.load({}, str(tmp_path))  # not in the stage folder, and no cache_dir given
  (mirror / "teacher_embeddings.npy").rename(tmp_path / "teacher_embeddings.npy")

  data = (tmp_path / "teacher_embeddings.npy").read_bytes()
  (tmp_path / "teacher_embeddings.npy").write_bytes(data[:len(data) // 2])   # truncated
  with pytest.raises(UserError, match="cannot read the teacher embeddings in"):
    extract.load({}, str(tmp_path))


def test_adaptor_targets_are_written_in_bounded_memory(tmp_path):
  # 24,000 images x 2 orientations x 4 teachers x 64-D: 49 MB of teacher embeddings read
  # through a memory map and 12 MB of targets written into one, in 4,096-row chunks.
  num, teachers, size, out_size = 24_000, 4, 64, 64
  source = np.lib.format.open_memmap(str(tmp_path / "emb.npy"), mode="w+", dtype=np.float32,
                                     shape=(num, 2, teachers, size))
  source[:] = np.random.default_rng(0).normal(size=(1, 2, teachers, size)).astype(np.float32)
  source[:, :, :, 0] = np.arange(num, dtype=np.float32)[:, None, None]
  source.flush()
  del source
  embeddings = np.load(tmp_path / "emb.npy", mmap_mode="r")
  weights = np.random.default_rng(1).normal(size=(teachers * size, out_size)).astype(np.float32)
  apply = jax.jit(lambda w, x: x @ w)
  tracemalloc.start()
  with files.npy_writer(str(tmp_path / "targets.npy"), (num, 2, out_size)) as out:
    adaptor_stage._map(apply, weights, embeddings, out)  # pylint: disable=protected-access
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 8e6, f"{peak / 1e6:.1f} MB of host memory for 12 MB of targets"
  targets = np.load(tmp_path / "targets.npy", mmap_mode="r")
  rows = [0, 1, 4095, 4096, 23_999]
  expected = embeddings[rows].reshape(len(rows), 2, teachers * size) @ weights
  np.testing.assert_allclose(targets[rows], expected, rtol=1e-4, atol=1e-3)


def test_streamed_embedding_equals_embedding_all_images_at_once():
  """embed_stream over uneven chunks gives the rows embed_images gives for the whole array."""
  from mstkd_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  module = models.create("iresnet18", width=4, embedding_size=8)
  variables = build.init_variables(module, jax.random.PRNGKey(1),
                                   np.zeros((1, 16, 16, 3), np.float32), train=False)
  images = np.random.default_rng(0).integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
  parallel = parallel_lib.get("pmap", 0)
  whole, whole_flip = embedding.embed_images(variables, module, images, parallel, 8)
  chunks = [images[:5], images[5:6], images[6:23]]
  streamed = list(embedding.embed_stream(variables, module, iter(chunks), parallel, 8, total=23))
  assert [len(e) for e, _ in streamed] == [5, 1, 17]
  np.testing.assert_allclose(np.concatenate([e for e, _ in streamed]), whole, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.concatenate([f for _, f in streamed]), whole_flip,
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(whole, whole_flip)
