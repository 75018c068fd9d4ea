"""The files of a run: atomic writes with one-line errors, JSON reads, the workdir lock."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mstkd_jax import files, workdir as workdir_lib
from mstkd_jax.errors import UserError


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path):
  path = tmp_path / "a.json"
  files.write_json(str(path), {"a": 1})
  with pytest.raises(RuntimeError):
    with files.atomic_path(str(path)) as tmp:
      with open(tmp, "w") as f:
        f.write('{"a": ')
      raise RuntimeError("interrupted")
  assert json.loads(path.read_text()) == {"a": 1}
  assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary file left behind


def test_temporary_names_are_unique(tmp_path):
  path = str(tmp_path / "x.npz")
  with files.atomic_path(path, suffix=".npz") as first, \
       files.atomic_path(path, suffix=".npz") as second:
    assert first != second and first.endswith(".npz") and second.endswith(".npz")
    np.savez(first, a=np.zeros(2))
    np.savez(second, a=np.ones(2))
  with np.load(path) as data:  # the last rename wins, whole
    np.testing.assert_array_equal(data["a"], np.zeros(2))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_os_errors_while_writing_are_one_line_naming_the_path(tmp_path, monkeypatch, code):
  path = tmp_path / "results.json"
  path.write_text("{}")

  def failing_replace(src, dst):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(files.os, "replace", failing_replace)
  with pytest.raises(UserError) as e:
    files.write_json(str(path), {"b": 2})
  message = str(e.value)
  assert "\n" not in message and str(path) in message
  assert errno.errorcode[code] in message and os.strerror(code) in message
  assert path.read_text() == "{}"
  assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_npy_writer_failure_leaves_no_file(tmp_path):
  path = str(tmp_path / "cache.npy")
  with pytest.raises(ValueError):
    with files.npy_writer(path, (4, 2)) as out:
      out[:2] = 1.0
      raise ValueError("chunk failed")
  assert os.listdir(tmp_path) == []


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "stage.json"
  assert files.read_json(str(path), missing=None) is None
  with pytest.raises(UserError, match=r"stage.json is missing; expected a stage record"):
    files.read_json(str(path), "a stage record")
  path.write_text("{not json")
  with pytest.raises(UserError, match=r"stage.json is unreadable .*expected a stage record"):
    files.read_json(str(path), "a stage record")


def test_lock_refuses_a_second_run_naming_the_holder(tmp_path):
  with workdir_lib.locked(str(tmp_path)):
    with pytest.raises(UserError) as e:
      with workdir_lib.locked(str(tmp_path)):
        pass
  message = str(e.value)
  assert f"process {os.getpid()} on {socket.gethostname()}" in message
  assert str(tmp_path) in message and "\n" not in message
  with workdir_lib.locked(str(tmp_path)):  # released on exit
    pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from mstkd_jax import workdir
          with workdir.locked({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(120)
          """)],
      stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"in use by process {holder.pid} on "):
      with workdir_lib.locked(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  deadline = time.monotonic() + 10
  with workdir_lib.locked(str(tmp_path)):  # the OS released the dead holder's lock
    assert time.monotonic() < deadline


def test_main_run_holds_the_lock(tmp_path):
  from configs import teacher as teacher_config  # pylint: disable=g-import-not-at-top
  from mstkd_jax import main  # pylint: disable=g-import-not-at-top
  with workdir_lib.locked(str(tmp_path)):
    with pytest.raises(UserError, match=r"is in use by process"):
      main.run(teacher_config.smoke(), str(tmp_path))


def test_root_config_history_keeps_every_accepted_run(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  first = ml_collections.ConfigDict({"seed": 0, "train": {"epochs": 2.0}})
  second = ml_collections.ConfigDict({"seed": 1, "train": {"epochs": 2.0}})
  workdir_lib.prepare(first, str(tmp_path), refuse_changes=False)
  workdir_lib.prepare(second, str(tmp_path), refuse_changes=False)
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
  lines = (tmp_path / workdir_lib.HISTORY_FILE).read_text().splitlines()
  assert [json.loads(line)["config"]["seed"] for line in lines] == [0, 1]
  assert all(json.loads(line)["pid"] == os.getpid() for line in lines)


def test_stage_config_change_is_refused_and_leaves_config_json(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir_lib.prepare(ml_collections.ConfigDict({"seed": 0}), str(tmp_path))
  with pytest.raises(UserError, match=r"differs in: seed: 0 -> 1"):
    workdir_lib.prepare(ml_collections.ConfigDict({"seed": 1}), str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 0}
  assert not (tmp_path / workdir_lib.HISTORY_FILE).exists()


def test_a_run_losing_the_race_still_names_the_holder(tmp_path, monkeypatch):
  # The holder's record of an earlier, finished run names a dead PID: not the holder.
  files.write_json(str(tmp_path / workdir_lib.HOLDER_FILE),
                   {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then"})
  import filelock  # pylint: disable=g-import-not-at-top
  holder = filelock.FileLock(str(tmp_path / workdir_lib.LOCK_FILE))
  holder.acquire()  # taken, its record not written yet (the race a second run may lose)
  try:
    def record_soon(_):
      files.write_json(str(tmp_path / workdir_lib.HOLDER_FILE),
                       {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
    monkeypatch.setattr(workdir_lib.time, "sleep", record_soon)
    with pytest.raises(UserError, match=rf"in use by process {os.getpid()} on .*, started now"):
      with workdir_lib.locked(str(tmp_path)):
        pass
  finally:
    holder.release()
  with workdir_lib.locked(str(tmp_path)):
    assert (tmp_path / workdir_lib.HOLDER_FILE).exists()
  assert not (tmp_path / workdir_lib.HOLDER_FILE).exists()  # removed on release


@pytest.mark.parametrize("file,content,reader,message", [
    ("results.json", "[1, 2]", lambda d: workdir_lib.read_results(d),
     "results.json holds a JSON list, not an object; expected the results.json of a stage"),
    ("results.json", '{"step": "3"}', lambda d: workdir_lib.read_results(d),
     'results.json: "step" holds "3"; expected the results.json of a stage'),
    ("stage.json", '"finished"', lambda d: workdir_lib.read_stage_record(d),
     "stage.json holds a JSON string, not an object; expected a stage record"),
    ("stage.json", '{"finished": true, "fields": {}, "inputs": {}, "outputs": {}}',
     lambda d: workdir_lib.read_stage_record(d),
     'stage.json: a finished stage without "fingerprint"; expected a stage record'),
    ("stage.json", '{"finished": true, "fingerprint": "f", "fields": {}, "inputs": {}, '
                   '"outputs": {"model": 12}}', lambda d: workdir_lib.read_stage_record(d),
     'stage.json: "outputs" entry \'model\' holds 12; expected {"size": bytes, "sha256": '),
    ("config.json", "[]", lambda d: workdir_lib.prepare({"seed": 0}, d),
     "config.json holds a JSON list, not an object; expected a readable config.json"),
])
def test_a_record_of_another_shape_is_refused_in_one_line_naming_the_file(
    tmp_path, file, content, reader, message):
  (tmp_path / file).write_text(content)
  with pytest.raises(UserError) as info:
    reader(str(tmp_path))
  assert str(info.value).startswith(f"{tmp_path / file}") and message in str(info.value)
  assert "\n" not in str(info.value)


def test_a_results_json_of_another_shape_is_rebuilt_by_a_rerun_of_its_stage(tmp_path):
  """A finished stage's saved results count only where results.json reads (a damaged one
  makes the stage evaluate again and write it anew)."""
  from mstkd_jax.stages import shared  # pylint: disable=g-import-not-at-top
  (tmp_path / "results.json").write_text("[]")
  assert shared._evaluated(str(tmp_path), 3) is None  # pylint: disable=protected-access


def test_a_damaged_lock_holder_record_still_says_the_workdir_is_in_use(tmp_path,
                                                                       monkeypatch):
  import filelock  # pylint: disable=g-import-not-at-top
  # (the wait for the holder to write its record: 0.2 s instead of 3)
  holder_wait = workdir_lib._holder  # pylint: disable=protected-access
  monkeypatch.setattr(holder_wait, "__defaults__", (0.2,))
  holder = filelock.FileLock(str(tmp_path / workdir_lib.LOCK_FILE))
  holder.acquire()
  try:
    for damaged in ('{"pid": 12', "[1, 2]"):
      (tmp_path / workdir_lib.HOLDER_FILE).write_text(damaged)
      with pytest.raises(UserError) as info:
        with workdir_lib.locked(str(tmp_path)):
          pass
      assert str(info.value) == (f"the workdir {tmp_path} is in use by another process; "
                                 "wait for it to finish, or use another --workdir")
  finally:
    holder.release()


def test_a_workdir_that_is_a_file_is_named_as_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("")
  for call in (lambda: workdir_lib.locked(str(path)).__enter__(),
               lambda: workdir_lib.prepare({"seed": 0}, str(path))):
    with pytest.raises(UserError, match=rf"^the workdir {path} is a file; expected a folder"):
      call()


def test_a_config_history_line_cut_short_is_dropped_not_merged_with_the_next(tmp_path, capsys):
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir_lib.prepare(ml_collections.ConfigDict({"seed": 0}), str(tmp_path),
                      refuse_changes=False)
  history = tmp_path / workdir_lib.HISTORY_FILE
  whole = history.read_text()
  history.write_text(whole + whole[:25])  # a second run killed while appending its line
  workdir_lib.prepare(ml_collections.ConfigDict({"seed": 1}), str(tmp_path),
                      refuse_changes=False)
  lines = history.read_text().splitlines()
  assert [json.loads(line)["config"]["seed"] for line in lines] == [0, 1]
  assert f"warning: {history}: dropped line 2, which is not a whole record" in (
      capsys.readouterr().out)


def test_a_new_field_at_its_registered_default_leaves_comparison_and_fingerprint_unchanged(
    tmp_path, monkeypatch):
  """A stage recorded before train.label_smoothing existed (a field registered with the
  value that computes what runs computed before it) is the same stage while the field
  holds that value; any other value is a change, named."""
  import hashlib  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(workdir_lib.NEW_FIELD_DEFAULTS, "train.label_smoothing", 0.0)
  old = {"seed": 0, "train": {"epochs": 2.0}}
  same = {"seed": 0, "train": {"epochs": 2.0, "label_smoothing": 0.0}}
  other = {"seed": 0, "train": {"epochs": 2.0, "label_smoothing": 0.1}}

  def fingerprint(fields):  # as the pipeline's stage records digest them
    flat = workdir_lib.flatten(fields)
    return hashlib.sha256(json.dumps([flat, {}], sort_keys=True).encode()).hexdigest()

  assert fingerprint(same) == fingerprint(old) != fingerprint(other)
  assert workdir_lib.changed_fields(old, same) == []
  assert workdir_lib.changed_fields(old, other) == [
      "train.label_smoothing: '<absent>' -> 0.1"]
  assert workdir_lib.flatten({"train": {"label_smoothing": False}}) == {
      "train.label_smoothing": False}  # False is not 0.0
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir_lib.prepare(ml_collections.ConfigDict(old), str(tmp_path))
  workdir_lib.prepare(ml_collections.ConfigDict(same), str(tmp_path))  # a resumption
  with pytest.raises(UserError, match=r"differs in: train.label_smoothing: '<absent>' -> 0.1"):
    workdir_lib.prepare(ml_collections.ConfigDict(other), str(tmp_path))
