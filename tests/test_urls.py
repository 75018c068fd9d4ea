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
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from mstkd_jax import files, paths, workdir as workdir_lib
from mstkd_jax.errors import UserError
from mstkd_jax.train.checkpoints import Checkpoints

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
  monkeypatch.setattr(type(epath.Path(url)), "mkdir", refuse)
  for make in (files.makedirs, lambda p: Checkpoints(p)):
    with pytest.raises(UserError) as error:
      make(f"{url}/checkpoints")
    assert str(error.value) == (f"cannot {'write' if make is files.makedirs else 'open'} "
                                f"{url}/checkpoints (PermissionDeniedError: Error executing "
                                "an HTTP request: HTTP response code 401)")


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


def test_output_records_skip_checkpoints_when_folders_are_listed_as_on_gcs(url,
                                                                           monkeypatch):
  """tf.io.gfile lists GCS sub-folders with a trailing "/" (tensorflow issue 39167); TF's
  RAM file system does not, so its walk is made to, as on GCS."""
  stage = f"{url}/teacher/group_a"
  files.write_bytes(f"{stage}/results.json", b"{}")
  files.write_bytes(f"{stage}/model/3/x.bin", b"m")
  files.write_bytes(f"{stage}/checkpoints/1/x.bin", b"not recorded")
  tf_walk = epath_backend._TfBackend.walk

  def gcs_walk(self, top, **kwargs):
    for root, dirs, names in tf_walk(self, top, **kwargs):
      dirs[:] = [d + "/" for d in dirs]
      yield root, dirs, names
  monkeypatch.setattr(epath_backend._TfBackend, "walk", gcs_walk)
  assert sorted(workdir_lib.output_record(stage)) == [os.path.join("model", "3", "x.bin"),
                                                      "results.json"]


class _MappedBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath's local backend with ram://<path> kept under the local folder `root`: the
  storage under a URL that Orbax's tensorstore (which cannot reach TF's RAM file system)
  reads and writes too, through the mapping of `_map_tensorstore`."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    text = os.fspath(path)
    if text.startswith(self.root + os.sep):  # the base class calling itself back
      return text
    assert text.startswith("ram://"), text
    return os.path.join(self.root, text[len("ram://"):])

  def url(self, path) -> str:
    return "ram://" + os.path.relpath(os.fspath(path), self.root)

  def open(self, path, mode):
    return super().open(self.local(path), mode)

  def walk(self, top, **kwargs):
    for root, dirs, names in super().walk(self.local(top), **kwargs):
      yield self.url(root), dirs, names

  def glob(self, path):
    return [self.url(p) for p in super().glob(self.local(path))]

  def rename(self, path, dst):
    super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    super().copy(self.local(path), self.local(dst), overwrite)


for _name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "rmtree", "remove", "stat"):
  def _mapped(self, path, *args, _method=getattr(epath_backend._OsPathBackend, _name),
              **kwargs):
    return _method(self, self.local(path), *args, **kwargs)
  setattr(_MappedBackend, _name, _mapped)


@pytest.fixture
def mapped_url(url, tmp_path, monkeypatch):
  """(ram://<bucket>/run, its local folder): a URL that epath and Orbax (tensorstore) both
  keep in one local folder, for Orbax checkpoints under a URL.

  Orbax handles a URL through epath (folders, metadata, the commit) and tensorstore (the
  arrays); tensorstore has no RAM file system of TF's, so both are pointed at `root`: epath's
  ram:// paths use `_MappedBackend`, and tensorstore's key-value specs get the same local
  path (`build_kvstore_tspec`, which every Orbax array read and write goes through). Our
  code sees only the URL. TensorFlow itself (clu's TensorBoard events) still writes its RAM
  file system, which nothing reads back.
  """
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "bucket_storage")
  os.makedirs(root)
  backend = _MappedBackend(root)
  tf_backend = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(gpath._GPath, "_backend", property(  # pylint: disable=protected-access
      lambda self: backend if self._uri_scheme == "ram" else tf_backend.fget(self)))
  build = tensorstore_utils.build_kvstore_tspec

  def mapped_build(directory, *args, **kwargs):
    text = os.fspath(directory)
    return build(backend.local(text) if text.startswith("ram://") else directory,
                 *args, **kwargs)
  monkeypatch.setattr(tensorstore_utils, "build_kvstore_tspec", mapped_build)
  return url, backend.local(url)


def test_checkpoints_and_models_on_a_url(mapped_url, capsys):
  url, local = mapped_url
  variables = {"params": {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
               "batch_stats": {"m": np.ones(3, np.float32)}}
  workdir_lib.save_model(url, 7, variables)
  assert os.path.isdir(os.path.join(local, "model", "7"))  # under the URL, not "ram:/..."
  assert not os.path.exists("ram:")
  assert workdir_lib.model_step(url) == 7
  restored = workdir_lib.load_model(url, variables, "teacher")
  np.testing.assert_array_equal(restored["params"]["w"], variables["params"]["w"])
  with pytest.raises(UserError, match=f"the model in {url}/model does not match"):
    workdir_lib.load_model(url, {"params": {"w": np.zeros((3, 3), np.float32)}}, "teacher")

  # A training run's checkpoints: a damaged newer step is skipped, and (an object store
  # cannot rename a folder) removed rather than set aside.
  checkpoints = Checkpoints(f"{url}/checkpoints", keep=3)
  try:
    for step in (2, 4):
      checkpoints.save(step, {**variables, "step": np.int32(step)},
                       history={"loss": [float(step)]})
    checkpoints.wait()
    os.remove(os.path.join(local, "checkpoints", "4", "default", "_METADATA"))
    step, state, history = checkpoints.restore_latest(
        {**variables, "step": np.int32(0)}, set_aside=True)
  finally:
    checkpoints.close()
  assert (step, int(state["step"]), history) == (2, 2, {"loss": [2.0]})
  assert capsys.readouterr().err.strip().endswith("using step 2; removed it")
  assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["2"]


# Every plain open() in mstkd_jax/, by file: how many and why none of them writes a path in
# a (possibly URL) workdir that has not been checked to be local first. A new open() on a
# workdir path must go through mstkd_jax.files (which takes URLs through etils.epath)
# instead, or be added here with the reason it is local.
OPEN_ALLOWED = {
    "files.py": (3, "atomic_path's local temporary files and appends to a local file "
                    "(URLs take epath)"),
    "main.py": (1, "os.devnull"),
    "embed.py": (1, "reads the user's list of images"),
    "interop/pth_format.py": (2, "reads a user's .pth; writes into atomic_path's "
                                 "local temporary file"),
    "formats/images.py": (1, "reads a user's image"),
    "formats/image_tree.py": (1, "writes a user's tree (--dst)"),
    "data/synthetic.py": (1, "the pairs .txt of the synthetic cache under data_dir, "
                             "which sources.data_dir keeps local (paths.local; a URL "
                             "workdir's local cache folder)"),
    "formats/landmarks.py": (1, "reads the user's landmarks file"),
    "formats/groups.py": (1, "reads the user's --groups file of prepare"),
    "formats/verification_bin.py": (1, "reads a user's .bin"),
    "formats/ijb.py": (1, "reads the IJB release's metadata"),
    "formats/recordio/reader.py": (2, "reads the user's .rec and .idx (local paths)"),
    "formats/recordio/writer.py": (2, "writes the user's .rec and .idx (local paths)"),
    "formats/recordio/identities.py": (2, "reads and writes the .identities.json beside a "
                                          "user's .rec"),
    "formats/rfw.py": (1, "reads the RFW release's pair lists"),
    "formats/convert.py": (1, "the converter's output (--dst, paths.local)"),
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


@pytest.mark.slow
def test_the_recipe_runs_resumes_and_reports_in_a_url_workdir(mapped_url, tiny_recipe,
                                                              tmp_path, capsys, monkeypatch):
  """The tiny recipe with --workdir=<URL>: every record, model, checkpoint, report and plot
  goes to the URL; the memory-mapped caches (teacher embeddings, targets) and the synthetic
  data go to the local cache_dir, and are recorded in stage.json. The numbers equal the
  same recipe's in a local workdir (the session's `tiny_recipe`)."""
  from configs import distill  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline  # pylint: disable=g-import-not-at-top
  url, local = mapped_url
  _, local_report = tiny_recipe
  config = distill.get_config("tiny")
  # Half the recipe (every kind of stage; the balanced set repeats them) keeps it short.
  config.update(teacher_sets=("specialized",), student_alone=False,
                cache_dir=str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)  # where a URL taken for a path would land ("ram:/...")
  same_models = lambda report: {m: local_report["models"][m] for m in report["models"]}
  report = pipeline.run(config, url)
  assert sorted(report["models"]) == ["adaptor/SL", "mstkd/SL/a-KD", "teacher/group_a",
                                      "teacher/group_b"]
  assert report["models"] == same_models(report)

  # Outputs are under the URL (its storage folder); caches and data under cache_dir.
  cache = paths.cache_dir(config.cache_dir, url)
  assert cache == str(tmp_path / "cache" / url.replace("://", "/"))
  for name in ("report/report.json", "report/report.md", "config.json",
               "teacher/group_a/model", "teacher/group_a/checkpoints", "teacher/group_a/stage.json",
               "adaptor/specialized/SL/verification_embeddings.npz",
               "extract/specialized/verification_teacher_embeddings.npz"):
    assert os.path.exists(os.path.join(local, name)), name
  assert any(n.endswith(".png") for n in os.listdir(os.path.join(local, "report")))
  for name in ("extract/specialized/teacher_embeddings.npy",
               "adaptor/specialized/SL/targets.npy"):
    assert os.path.isfile(os.path.join(cache, name)), name
    assert not os.path.exists(os.path.join(local, name)), name
  assert os.path.isdir(os.path.join(cache, "data"))   # the synthetic set's cache
  record = files.read_json(f"{url}/adaptor/specialized/SL/stage.json")
  assert "targets.npy" in record["caches"] and "targets.npy" not in record["outputs"]

  # A trained model is read straight from the URL (evaluate, export and embed load it so).
  from mstkd_jax.interop import resolve  # pylint: disable=g-import-not-at-top
  student = "student/mstkd/SL/a-KD"
  remote = resolve.load_model(f"{url}/{student}", resolve.ArchSettings())
  here = resolve.load_model(os.path.join(tiny_recipe[0], student), resolve.ArchSettings())
  assert remote.path == f"{url}/{student}/model/{remote.step}"
  assert remote.origins == here.origins and remote.step == here.step
  for a, b in zip(jax.tree.leaves(remote.variables), jax.tree.leaves(here.variables)):
    np.testing.assert_array_equal(a, b)

  # A finished run in the URL reruns nothing; without its local caches (another machine)
  # still nothing, since no stage that reads them has to run.
  capsys.readouterr()
  shutil.rmtree(os.path.join(cache, "extract"))
  shutil.rmtree(os.path.join(cache, "adaptor"))
  report = pipeline.run(config, url)
  assert report["models"] == same_models(report)
  out = capsys.readouterr().out
  assert "[pipeline] stage" not in out and "will rerun" not in out and "remaking" not in out

  # A stage that reads a missing cache has to run: the caches are remade from the saved
  # adaptor and teachers (the adaptor's from the extraction's, remade first), nothing is
  # trained again but that stage, and the remade caches are the recorded ones. (The
  # extraction's record is altered here, as if another machine had made it: its remade
  # cache differs, which a warning says, and the record takes the new one.)
  extract_record = files.read_json(f"{url}/extract/specialized/stage.json")
  made_here = extract_record["caches"]
  extract_record["caches"] = {k: {**v, "sha256": "0" * 64} for k, v in made_here.items()}
  files.write_json(f"{url}/extract/specialized/stage.json", extract_record)
  config.force = student
  report = pipeline.run(config, url)
  assert report["models"] == same_models(report)
  captured = capsys.readouterr()
  stages_run = [line.split()[2] for line in captured.out.splitlines()
                if line.startswith("[pipeline] stage ")]
  assert stages_run == [student, "report"]
  for name, file in (("extract/specialized", "teacher_embeddings.npy"),
                     ("adaptor/specialized/SL", "targets.npy")):
    assert (f"[pipeline] {name}: remaking its caches, which a stage to run reads (its caches "
            f"in {os.path.join(cache, name)} are not as it left them ({file} is missing))"
            ) in captured.out
  assert captured.err.count("differ from the ones the finished stages after it read") == 1
  assert ("warning: extract/specialized: its remade caches in "
          f"{os.path.join(cache, 'extract/specialized')} differ") in captured.err
  assert files.read_json(f"{url}/extract/specialized/stage.json")["caches"] == made_here
  assert workdir_lib.damaged_output(
      os.path.join(cache, "adaptor/specialized/SL"),
      files.read_json(f"{url}/adaptor/specialized/SL/stage.json")["caches"]) is None
  assert sorted(os.listdir(tmp_path)) == ["bucket_storage", "cache"]  # nothing else local


def test_every_host_writes_its_own_caches_where_they_are_not_in_the_stage_folder(
    tmp_path, monkeypatch):
  """Process 0 alone writes caches in a (shared) local stage folder; every process writes
  its own copy in a local cache folder (cache_dir, or a URL workdir's), which the other
  hosts cannot see."""
  from mstkd_jax.stages import shared  # pylint: disable=g-import-not-at-top
  stage = str(tmp_path / "run" / "extract")
  for process, cache, folder, writes in (
      (0, "", stage, True), (1, "", stage, False),
      (1, str(tmp_path / "c"), stage, True), (1, "", "gs://b/run/extract", True)):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    config = {"cache_dir": cache}
    assert shared.writes_caches(config, folder) is writes, (process, cache, folder)
  assert shared.cache_file({"cache_dir": ""}, "gs://b/run/extract", "x.npy") == os.path.join(
      paths.cache_dir("", "gs://b/run/extract"), "x.npy")


def test_a_single_stage_in_a_url_workdir_keeps_the_synthetic_data_in_cache_dir(
    url, tmp_path, monkeypatch):
  from configs import teacher  # pylint: disable=g-import-not-at-top
  from mstkd_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))  # left as it is
  monkeypatch.setattr(main, "_stages", lambda: {"teacher": lambda config, workdir: config})
  config = teacher.get_config("tiny")
  config.cache_dir = str(tmp_path / "cache")
  ran = main.run(config, url)
  assert ran.data.data_dir == os.path.join(paths.cache_dir(config.cache_dir, url), "data")
  assert not config.data.data_dir  # the caller's config is left as it was
