"""User-given paths: absolute, ~ expanded, URLs refused with the flag or field named."""

import os
import tempfile

import ml_collections
import pytest

from mstkd_jax import paths
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError


def test_paths_are_made_absolute_and_urls_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.local("runs/a", "--workdir") == str(tmp_path / "runs" / "a")
  assert paths.local("~/x", "--workdir") == str(tmp_path / "home" / "x")
  assert paths.local(tmp_path / "p", "--out") == str(tmp_path / "p")
  assert paths.local("weird:name/x", "--out") == str(tmp_path / "weird:name" / "x")
  for url in ("gs://bucket/dir", "s3://b/k", "file:///tmp/x", "hdfs://nn/x"):
    with pytest.raises(UserError, match=f"--data_dir='{url}' is a URL;.*mount"):
      paths.local(url, "--data_dir")


def _data(source, data_dir=""):
  return ml_collections.ConfigDict({"source": source, "data_dir": data_dir,
                                    "tfds": {"train": "faces", "verification": "rfw"}})


def test_data_dir_defaults(tmp_path, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  workdir = str(tmp_path / "wd")
  assert sources.data_dir(_data("synthetic"), workdir) == os.path.join(workdir, "data")
  assert sources.data_dir(_data("tfds", str(tmp_path / "d")), workdir) == str(tmp_path / "d")
  with pytest.raises(UserError, match="data.data_dir .*or the environment variable TFDS_DATA_DIR"):
    sources.data_dir(_data("tfds"), workdir)
  # TFDS's own variable, for the tfds source only; the config field wins over it.
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert sources.data_dir(_data("tfds"), workdir) == str(tmp_path / "tfds")
  assert sources.data_dir(_data("synthetic"), workdir) == os.path.join(workdir, "data")
  assert sources.data_dir(_data("tfds", str(tmp_path / "d")), workdir) == str(tmp_path / "d")
  # Data folders are local: array_record (TFDS) reads local files only, the synthetic set's
  # cache is memory-mapped; a URL workdir's synthetic cache is in its local cache folder.
  monkeypatch.setenv("TFDS_DATA_DIR", "gs://bucket/tensorflow_datasets")
  with pytest.raises(UserError, match="^TFDS_DATA_DIR='gs://bucket/tensorflow_datasets' is a "
                     r"URL, but .*array_record#120\). Copy the folder to a local disk "
                     r"\(gsutil -m cp -r gs://bucket/tensorflow_datasets /local/dir\)"):
    sources.data_dir(_data("tfds"), workdir)
  with pytest.raises(UserError, match="config field data.data_dir='gs://b/d' is a URL, but"):
    sources.data_dir(_data("tfds", "gs://b/d"), workdir)
  with pytest.raises(UserError, match="config field data.data_dir='gs://b/d' is a URL"):
    sources.data_dir(_data("synthetic", "gs://b/d"), workdir)
  assert sources.data_dir(_data("synthetic"), "gs://b/run") == os.path.join(
      paths.cache_dir("", "gs://b/run"), "data")
  assert sources.data_dir(_data("synthetic"), "gs://b/run", str(tmp_path / "c")) == str(
      tmp_path / "c" / "gs" / "b" / "run" / "data")


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/a", "--workdir") == str(tmp_path / "runs" / "a")
  assert paths.resolve("gs://bucket/run/", "--workdir") == "gs://bucket/run"
  assert paths.resolve("file:///tmp/x", "--workdir") == "file:///tmp/x"
  for bad in ("gs://", "gs:///", ""):
    with pytest.raises(UserError, match="--workdir"):
      paths.resolve(bad, "--workdir")


def test_cache_dir_is_local_and_one_per_stage_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.cache_dir("", str(tmp_path / "wd")) == str(tmp_path / "wd")
  assert paths.cache_dir("", "wd/") == str(tmp_path / "wd")
  assert paths.cache_dir("c", "gs://b/run/extract/x") == str(tmp_path / "c/gs/b/run/extract/x")
  assert paths.cache_dir("c", "/data/run") == str(tmp_path / "c/data/run")
  remote = paths.cache_dir("", "gs://b/run")
  assert remote == os.path.join(tempfile.gettempdir(), "mstkd_cache", "gs/b/run")
  assert remote == paths.cache_dir("", "gs://b/run/") != paths.cache_dir("", "gs://b/other")
  assert paths.cache_dir("", "s3://b/run") != remote
  with pytest.raises(UserError, match="cache_dir='gs://b/c' is a URL"):
    paths.cache_dir("gs://b/c", "gs://b/run")
