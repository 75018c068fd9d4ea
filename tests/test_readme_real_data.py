"""What the README tells a user to type for real data is accepted as written, and its
example progress line is what the loop prints (format and `lr` arithmetic)."""

import os
import re
import shlex

from absl import flags
import numpy as np
from ml_collections import config_flags
import pytest

from mstkd_jax.formats import prepare
from mstkd_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _commands(after: str) -> list[list[str]]:
  """The commands of the first ```bash block after the text `after`, as argument lists."""
  text = _readme()
  start = text.index("```bash", text.index(after)) + len("```bash")
  block = text[start:text.index("```", start)].replace("\\\n", " ")
  return [shlex.split(line) for line in block.splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def _main_config(argv: list[str]):
  """The config `python -m mstkd_jax.main` would build from these arguments."""
  argv = ["main"] + [a for a in argv if a.startswith(("--config", "--workdir"))]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config


def _check_prepare(argv: list[str]):
  fv = flags.FlagValues()
  prepare._define_flags(fv)  # pylint: disable=protected-access
  fv(["prepare"] + argv)
  return fv


@pytest.mark.parametrize("after,preset", [
    ("## Real data", "bupt_iresnet34"),
    ("To try the recipe's plumbing on a small tree", "smoke")])
def test_the_documented_real_data_commands_parse(after, preset, monkeypatch):
  monkeypatch.chdir(ROOT)  # the README's commands run from the repository root
  commands = _commands(after)
  mains = [c[3:] for c in commands if c[:3] == ["python", "-m", "mstkd_jax.main"]]
  prepares = [c[3:] for c in commands if c[:3] == ["python", "-m", "mstkd_jax.formats.prepare"]]
  assert len(mains) == 1 and len(prepares) == 2
  names = {_check_prepare(argv).name for argv in prepares}
  config = _main_config(mains[0])
  assert config.preset == preset and config.data.source == "tfds"
  assert {config.data.tfds.train, config.data.tfds.verification} == names
  assert config.data.data_dir
  if preset == "smoke":  # stored at the model's size: nothing resized at run time
    sizes = {_check_prepare(argv).image_size for argv in prepares}
    assert sizes == {config.data.tfds.image_size} == {32}


def test_the_example_progress_line_is_the_loops(monkeypatch):
  monkeypatch.chdir(ROOT)
  text = _readme()
  section = text[text.index("## One stage at a time"):]
  command = _commands("## One stage at a time")[0]
  config = _main_config(command[3:])
  line = section[section.index("```\n[") + 4:].splitlines()[0]
  found = re.fullmatch(
      r"\[teacher/(\w+)\] step (\d+)/(\d+) \(epoch ([\d.]+)\) loss [\d.]+ accuracy [\d.]+ "
      r"lr ([\d.e-]+) \| [\d.]+ steps/s \d+ img/s \| ETA \d+:\d\d:\d\d", line)
  assert found, line
  group, step, total, epoch, lr = found.groups()
  step, total = int(step), int(total)
  spec = config.data.synthetic
  steps_per_epoch = (spec.identities_per_group * spec.images_per_identity
                     // config.train.batch_size)
  assert group == config.teacher.group and float(epoch) == round(step / steps_per_epoch, 2)
  assert total == int(config.train.epochs * steps_per_epoch)
  # `lr` is the mean of the LR over the window's steps (README), computed as the loop does.
  schedule = state_lib.step_decay_schedule(
      state_lib.scaled_lr(config.optim.base_lr, config.train.batch_size), steps_per_epoch,
      config.optim.lr_decay_epochs, config.optim.lr_decay_factor)
  window = range(step - config.train.log_every, step)
  assert float(lr) == float(f"{np.mean([float(schedule(s)) for s in window]):.4g}")
