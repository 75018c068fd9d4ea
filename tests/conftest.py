"""Test set-up, before JAX is imported: 8 simulated CPU devices, a compilation cache shared by
the tests of one session (stages rebuilt with the same shapes compile once), and the repo on
sys.path (for `configs`)."""

import os
import re
import sys
import tempfile

import pytest

# XLA flags the user gave (e.g. --xla_cpu_max_isa=AVX2 to run the suite on XLA's AVX2 code
# path), kept for the child processes of the tests too (child_xla_flags).
USER_XLA_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                        os.environ.get("XLA_FLAGS", "")).strip()
os.environ["XLA_FLAGS"] = (USER_XLA_FLAGS + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="mstkd_jax_test_compilation_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a test's child process: the user's flags plus `flags` (the suite's 8
  simulated devices left out)."""
  return " ".join((USER_XLA_FLAGS,) + flags).strip()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes a minute or more on 2 CPU cores (still run by the README's "
      "test command and CI; deselect with -m 'not slow' for a quick pass)")


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
  """(workdir, report) of the whole recipe run once on configs/distill.py:tiny, shared by the
  tests that read a finished run (copy it before changing anything in it). With several
  pytest-xdist workers the first to need it trains it, in a folder they all share, and the
  others, waiting on its lock, read the finished run (nothing reruns)."""
  import filelock  # pylint: disable=g-import-not-at-top
  from configs import distill  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline  # pylint: disable=g-import-not-at-top
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    workdir = str(tmp_path_factory.mktemp("tiny_recipe"))
    return workdir, pipeline.run(distill.get_config("tiny"), workdir)
  shared_root = tmp_path_factory.getbasetemp().parent
  workdir = str(shared_root / "tiny_recipe")
  with filelock.FileLock(str(shared_root / "tiny_recipe.lock")):
    return workdir, pipeline.run(distill.get_config("tiny"), workdir)


def pytest_xdist_auto_num_workers(config):
  """Workers for `-n auto` (pyproject.toml's addopts): one per core, at most 4 (each holds
  JAX, TensorFlow and 8 simulated devices: about 2 GB)."""
  del config
  return min(4, os.cpu_count() or 1)
