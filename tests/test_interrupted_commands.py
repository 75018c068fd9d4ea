"""Ctrl-C in a command other than main (evaluate, export, embed, bench, plan, prepare,
convert, align) ends with one `error:` line and exit code 130, as main does, not with a
traceback; a UserError with one line and its exit code."""

import os

import pytest

from mstkd_jax import errors
from mstkd_jax.formats import align, convert, prepare
from mstkd_jax.interop import command_line


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt


def test_the_model_commands_end_with_one_line_and_130(monkeypatch, capsys):
  # evaluate, export and embed run their body through command_line.run_command, which ends the
  # process with os._exit (no interpreter shutdown beside XLA's threads).
  def exit_now(code):
    raise SystemExit(code)
  monkeypatch.setattr(os, "_exit", exit_now)
  with pytest.raises(SystemExit) as ended:
    command_line.run_command(["evaluate"], _interrupt)
  assert ended.value.code == errors.INTERRUPTED == 130
  out, err = capsys.readouterr()
  assert out == ""
  assert err.splitlines() == [err.strip()] and err.startswith("error: interrupted")


def test_bench_and_plans_entry_point_ends_each_error_in_one_line_and_its_code(monkeypatch,
                                                                             capsys):
  def exit_now(code):
    raise SystemExit(code)
  monkeypatch.setattr(os, "_exit", exit_now)

  def raising(error):
    def main(argv):
      assert argv == ["plan"]
      raise error
    return errors.guarded(main)

  for error, code, line in [
      (KeyboardInterrupt(), 130, "error: interrupted"),
      (errors.UserError("--topology: expected a TPU topology"), 1,
       "error: --topology: expected a TPU topology"),
      (command_line.FlagError("--arch='x': unknown architecture"), 2,
       "error: --arch='x': unknown architecture")]:
    with pytest.raises(SystemExit) as ended:
      raising(error)(["plan"])
    assert ended.value.code == code
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()] and err.startswith(line)


@pytest.mark.parametrize("module,function,argv", [
    (prepare, "prepare", ["--format=image_tree", "--src=/nowhere", "--data_dir=/nowhere"]),
    (convert, "tree_to_rec", ["tree_to_rec", "--src=/nowhere", "--dst=/nowhere/x.rec"]),
    (align, "align_folder", ["--src=/nowhere", "--landmarks=/nowhere.txt",
                             "--dst=/elsewhere"]),
], ids=["prepare", "convert", "align"])
def test_the_format_commands_end_with_one_line_and_130(module, function, argv, monkeypatch,
                                                       capsys):
  monkeypatch.setattr(module, function, _interrupt)
  assert module.main(argv) == 130
  out, err = capsys.readouterr()
  assert out == ""
  assert err.splitlines() == [err.strip()] and err.startswith("error: interrupted")
