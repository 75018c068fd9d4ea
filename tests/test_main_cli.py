"""The command line: config mistakes stop with one line, no traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "-m", "mstkd_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/teacher.py:bogus"],
     "unknown preset 'bogus' for configs/teacher.py; expected one of"),
    (["--config=configs/teacher.py:smoke", "--config.trian.epochs=3"],
     'Did you mean "train" instead of "trian"?'),
    (["--config=configs/teacher.py:smoke", "--config.train.epochs=abc"],
     "--config.train.epochs=abc: could not convert string to float"),
    (["--config=configs/missing.py"], "configs/missing.py"),
    # The recipe has no top-level train/optim: each stage has its own section.
    (["--config=configs/distill.py", "--config.train.batch_size=32"],
     "unknown config field 'train.batch_size' (in configs/distill.py); the config has: "
     "adaptor, adaptors, balanced_seed, cache_dir, data,"),
    (["--config=configs/distill.py", "--config.optim.base_lr=0.5"],
     "unknown config field 'optim.base_lr'"),
    (["--config=configs/distill.py:smoke", "--config.teacher.train.bogus=1"],
     "unknown config field 'teacher.train.bogus' (in configs/distill.py:smoke); "
     "teacher.train has: batch_size, checkpoint_every, epochs, eval_batch_size, eval_every, "
     "keep_checkpoints, log_every, select"),
])
def test_config_mistakes_stop_with_one_clear_message(args, message, tmp_path):
  result = _main(*args, f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)


def test_default_workdir_is_named_after_config_and_preset():
  from mstkd_jax import main  # pylint: disable=g-import-not-at-top
  assert main.default_workdir("configs/teacher.py:smoke") == os.path.join(
      "workdir", "teacher_smoke")
  assert main.default_workdir("configs/distill.py") == os.path.join("workdir", "distill_default")


def test_a_url_workdir_that_cannot_be_written_stops_in_one_line():
  """A URL workdir is written through etils.epath (tests/test_urls.py); one its storage
  library refuses stops at the write check with that library's error in one line, and
  nothing local is made of it. (s3:// fails at once and offline: TensorFlow, epath's
  backend here, has no S3 file system; a gs:// URL without credentials gives
  "cannot be written (PermissionDeniedError: ...)" or, offline, "(OSError: ... Could not
  resolve host ...)" the same way, checked by hand.)"""
  result = _main("--config=configs/teacher.py:smoke", "--workdir=s3://my-bucket/run1")
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: the workdir s3://my-bucket/run1 cannot be written "
                    "(UnimplementedError: File system scheme 's3' not implemented (file: "
                    "'s3://my-bucket/run1'))"]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(ROOT, "s3:"))
