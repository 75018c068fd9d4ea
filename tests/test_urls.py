"""URL workdirs (gs://...): the file helpers and the workdir's records through etils.epath.

The scheme under test is TensorFlow's in-memory file system, ram://, registered with
etils.epath exactly as epath registers gs:// (same path class, PosixGPath; same URI
tables; with TensorFlow installed, same backend: tf.io.gfile, epath's `_TfBackend`). A
ram:// path therefore runs every line that a gs:// path runs in epath and in tf.io.gfile's
Python layer; only the file system TensorFlow dispatches to at the bottom differs (its RAM
file system instead of its GCS one). No network, no credentials.
"""

import ast
import hashlib
import io
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from mstkd_jax import files, paths, workdir as workdir_lib
from mstkd_jax.errors import UserError

pytest.importorskip("tensorflow")
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils.epath import backend as epath_backend  # pylint: disable=wrong-import-position
from etils.epath import gpath, register  # pylint: disable=wrong-import-position


@pytest.fixture
def url(tmp_path, monkeypatch):
  """A fresh ram://<bucket>/run, with ram:// registered in epath as gs:// is.

  One difference of TF's RAM file system is made good: opening an existing file for
  writing appends to it (b"111" then b"2" reads b"1112"), where a new GCS object replaces
  the old one whole; the open below removes a ram:// file first when opened for writing.
  """
  tf_open = epath_backend._TfBackend.open

  def replacing_open(self, path, mode):
    if "w" in mode and os.fspath(path).startswith("ram://") and self.exists(path):
      self.remove(path)
    return tf_open(self, path, mode)
  monkeypatch.setattr(epath_backend._TfBackend, "open", replacing_open)
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", gpath._PREFIX_TO_BACKEND["gs"])
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://",
                      register._URI_PREFIXES_TO_CLS["gs://"])
  bucket = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]  # RAM is per process
  return f"ram://{bucket}/run"


def test_ram_urls_take_the_gs_code_path(url):
  ram, gs = epath.Path(url), epath.Path("gs://bucket/run")
  assert type(ram) is type(gs)
  assert ram._backend is gs._backend is epath_backend.tf_backend
  assert str(ram) == url and str(ram / "x.json") == f"{url}/x.json"


def test_file_helpers_round_trip_on_a_url(url):
  files.write_json(f"{url}/a.json", {"a": 1})
  assert files.read_json(f"{url}/a.json") == {"a": 1}
  assert files.read_json(epath.Path(url) / "a.json") == {"a": 1}  # epath.Path accepted
  files.write_json(f"{url}/a.json", {"a": 2})  # an object is replaced whole
  assert files.read_json(f"{url}/a.json") == {"a": 2}
  assert files.read_json(f"{url}/none.json", missing={}) == {}
  with pytest.raises(UserError, match=f"^{url}/none.json is missing; expected x$"):
    files.read_json(f"{url}/none.json", "x")
  files.write_bytes(f"{url}/bad.json", b"{")
  with pytest.raises(UserError, match=f"^{url}/bad.json is unreadable"):
    files.read_json(f"{url}/bad.json")

  files.save_npz(f"{url}/e.npz", {"e": np.arange(6.0).reshape(2, 3)})
  with np.load(io.BytesIO(files.read_bytes(f"{url}/e.npz"))) as data:
    np.testing.assert_array_equal(data["e"], np.arange(6.0).reshape(2, 3))

  with files.atomic_path(f"{url}/m.npy", suffix=".npy") as tmp:
    assert not paths.is_url(tmp) and tmp.endswith(".npy")  # a local temporary file
    np.save(tmp, np.ones(3))
  assert not os.path.exists(tmp)
  np.testing.assert_array_equal(np.load(io.BytesIO(files.read_bytes(f"{url}/m.npy"))),
                                np.ones(3))
  with pytest.raises(RuntimeError):  # a failed block uploads nothing
    with files.atomic_path(f"{url}/never.bin") as tmp:
      pathlib.Path(tmp).write_bytes(b"half")
      raise RuntimeError("interrupted")
  assert not epath.Path(f"{url}/never.bin").exists() and not os.path.exists(tmp)

  files.append_text(f"{url}/h.jsonl", "1\n")
  files.append_text(f"{url}/h.jsonl", "2\n")
  assert files.read_bytes(f"{url}/h.jsonl") == b"1\n2\n"
  with pytest.raises(FileNotFoundError):
    files.read_bytes(f"{url}/none.bin")
  with pytest.raises(UserError, match=f"^{url}/c.npy is a URL; a memory-mapped cache needs "
                     "a local disk"):
    with files.npy_writer(f"{url}/c.npy", (2, 3)):
      pass


def test_storage_errors_are_one_line_naming_the_url(url, monkeypatch):
  """What a gs:// path without credentials gives (tf.io.gfile's error: a multi-line
  message), shortened to its type and first line, naming the path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def refuse(self, mode="r", **kwargs):
    raise tf.errors.PermissionDeniedError(
        None, None, "Error executing an HTTP request: HTTP response code 401\n\t when "
        "initiating an upload to gs://b/run/a.json\n" + "retry log line\n" * 50)
  monkeypatch.setattr(type(epath.Path(url)), "open", refuse)
  for write in (lambda p: files.write_json(p, {}), lambda p: files.save_npz(p, {}),
                lambda p: files.write_bytes(p, b"")):
    with pytest.raises(UserError) as error:
      write(f"{url}/a.json")
    assert str(error.value) == (f"cannot write {url}/a.json (PermissionDeniedError: Error "
                                "executing an HTTP request: HTTP response code 401)")
  with pytest.raises(UserError, match=f"^the workdir {url} cannot be written "
                     r"\(PermissionDeniedError: .* 401\)$"):
    workdir_lib.prepare(ml_collections.ConfigDict({"a": 1}), url)


def test_url_error_is_short():
  error = files.url_error("gs://b/x", OSError("y" * 1000 + "\nsecond line"))
  assert "\n" not in str(error) and len(str(error)) < files.URL_ERROR_CHARS + 40
  assert str(error).startswith("cannot write gs://b/x (OSError: yyy")


def test_workdir_records_on_a_url(url, capsys):
  config = ml_collections.ConfigDict({"a": 1, "train": {"log_every": 5}})
  assert workdir_lib.prepare(config, url + "/") == url
  assert files.read_json(f"{url}/config.json") == {"a": 1, "train": {"log_every": 5}}
  assert [p.name for p in epath.Path(url).iterdir()] == ["config.json"]  # probe removed
  config.train.log_every = 7  # a run-control field: accepted
  workdir_lib.prepare(config, url)
  config.a = 2
  with pytest.raises(UserError, match=r"holds a run of another config .*a: 1 -> 2"):
    workdir_lib.prepare(config, url)
  workdir_lib.prepare(config, url, refuse_changes=False)
  workdir_lib.prepare(config, url, refuse_changes=False)
  lines = files.read_bytes(f"{url}/{workdir_lib.HISTORY_FILE}").decode().splitlines()
  assert [json.loads(line)["config"]["a"] for line in lines] == [2, 2]

  with workdir_lib.locked(url):
    pass
  assert "is a URL: not locked" in capsys.readouterr().out

  stage = f"{url}/teacher/group_a"
  workdir_lib.write_results(stage, "teacher", 3, {"group_a": {
      "accuracy": 0.9, "accuracy_std": 0.01, "accuracy_noflip": 0.89}})
  files.save_npz(f"{stage}/verification_embeddings.npz", {"e": np.zeros((2, 4))})
  files.write_bytes(f"{stage}/sub/x.bin", b"abc")
  files.write_bytes(f"{stage}/checkpoints/1.bin", b"not recorded")
  assert workdir_lib.read_results(stage)["step"] == 3
  record = workdir_lib.output_record(stage)
  assert sorted(record) == ["results.json", os.path.join("sub", "x.bin"),
                            "verification_embeddings.npz"]
  assert record[os.path.join("sub", "x.bin")] == {
      "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
  assert workdir_lib.damaged_output(stage, record) is None
  files.write_bytes(f"{stage}/sub/x.bin", b"abd")
  assert workdir_lib.damaged_output(stage, record) == (
      f"{os.path.join('sub', 'x.bin')} changed since the stage finished")
  epath.Path(f"{stage}/results.json").unlink()
  assert workdir_lib.damaged_output(stage, record) == "results.json is missing"


def test_models_under_a_url_are_refused_in_one_line(url):
  with pytest.raises(UserError, match=f"checkpoints in {url}/model: a URL checkpoint "
                     "folder is not supported yet"):
    workdir_lib.model_step(url)


# Every plain open() in mstkd_jax/, by file: how many and why none of them writes a path in
# a (possibly URL) workdir that has not been checked to be local first. A new open() on a
# workdir path must go through mstkd_jax.files (which takes URLs through etils.epath)
# instead, or be added here with the reason it is local.
OPEN_ALLOWED = {
    "files.py": (5, "the local branches of the helpers themselves (URLs take epath)"),
    "workdir.py": (2, "_check_shared (local workdirs only) and the digest's local branch"),
    "main.py": (1, "os.devnull"),
    "bench.py": (2, "--out of the benchmark, a local file the user names"),
    "embed.py": (1, "reads the user's list of images"),
    "interop/torch_checkpoint.py": (2, "reads a user's .pth; writes into atomic_path's "
                                       "local temporary file"),
    "train/checkpoints.py": (1, "Orbax step metadata; Checkpoints refuses URL folders"),
    "train/writers.py": (1, "the JSON-lines fallback writer (no TensorBoard); URL "
                            "workdirs are refused before it (main.py, paths.local)"),
    "data/image_tree.py": (2, "reads a user's image; writes a user's tree (--dst)"),
    "data/synthetic.py": (1, "the pairs .txt of the synthetic cache under data_dir, "
                             "which sources.data_dir keeps local (paths.local)"),
    "data/align.py": (1, "reads the user's landmarks file"),
    "data/verification_bin.py": (1, "reads a user's .bin"),
    "data/ijb.py": (1, "reads the IJB release's metadata"),
    "data/tfds_builders.py": (1, "the labels file of a TFDS data_dir (paths.local)"),
    "data/recordio.py": (6, "reads and writes the user's RecordIO files (local paths)"),
    "data/rfw.py": (1, "reads the RFW release's pair lists"),
    "data/convert.py": (1, "the converter's output (--dst, paths.local)"),
}


def _open_calls(path: pathlib.Path) -> int:
  tree = ast.parse(path.read_text(encoding="utf-8"))
  return sum(isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "open" for node in ast.walk(tree))


def test_nothing_writes_a_workdir_path_through_plain_open():
  """The builtin open() cannot reach a gs:// workdir (it would write a local folder named
  "gs:"), so every file of a run goes through mstkd_jax.files / etils.epath. This counts
  the plain open() calls (the builtin by name; `x.open(...)` methods, epath's included,
  are not counted) of every module and compares them with OPEN_ALLOWED, which says for
  each why its calls only see local paths: user data the user names, local caches, or
  folders already refused as URLs. A new call fails this test until it goes through
  mstkd_jax.files or is listed with its reason."""
  root = pathlib.Path(files.__file__).parent
  found = {}
  for path in sorted(root.rglob("*.py")):
    count = _open_calls(path)
    if count:
      found[path.relative_to(root).as_posix()] = count
  assert found == {name: count for name, (count, _) in OPEN_ALLOWED.items()}
