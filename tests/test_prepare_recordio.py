"""`prepare` on RecordIO packs whose identity records disagree with the image labels."""

import json

import numpy as np
import pytest

import data_fixtures as fx
from mstkd_jax.formats import prepare
from mstkd_jax.data import prepared
from mstkd_jax.errors import UserError


def _glint_like(root):
  """Identity ranges holding images labeled as other identities; returns (rec, labels)."""
  ids = [[fx.jpeg_bytes(40 + 3 * j + k) for k in range(n)] for j, n in enumerate((3, 2, 3))]
  # Keys: identity 0 -> 1..3, 1 -> 4..5, 2 -> 6..8; keys 3 and 7 carry other labels.
  override = {3: 1, 7: 0}
  rec = str(root / "glint" / "train.rec")
  root.joinpath("glint").mkdir()
  written = fx.write_rec_fixture(rec, ids, image_label_override=override)
  return rec, [override.get(key, label) for key, label in written]


def test_prepare_reports_and_uses_the_image_labels(tmp_path, capsys):
  rec, labels = _glint_like(tmp_path)
  data_dir = str(tmp_path / "prepared")
  with pytest.raises(UserError, match=r"train\.rec#3: image label 1 disagrees with identity "
                     "record 0"):
    prepare.prepare("recordio", rec, data_dir, name="strict", log=lambda _: None,
                    strict_identity_records=True)
  assert not (tmp_path / "prepared" / "mstkd_faces" / "strict").exists()
  logs = []
  out = prepare.prepare("recordio", rec, data_dir, name="glint", log=logs.append)
  assert out["identity_record_disagreements"] == 2
  assert out["num_images"] == 8 and out["num_identities"] == 3
  warnings_logged = [line for line in logs if line.startswith("warning: ")]
  assert len(warnings_logged) == 1 and "2 of 8 images" in warnings_logged[0]
  identity, _ = prepared.read_labels(out["path"])
  np.testing.assert_array_equal(identity, labels)
  np.testing.assert_array_equal(np.bincount(identity), [3, 3, 2])

  # The command line: the count in the one JSON line, the warning on stderr; strict
  # refuses with one error line.
  assert prepare.main(["--format=recordio", f"--src={rec}", f"--data_dir={data_dir}",
                       "--name=glint_cli"]) == 0
  captured = capsys.readouterr()
  # The JSON line is the last (in-process, TFDS's own progress lines reach capsys' stdout;
  # test_tfds_data checks that a real process prints that line alone).
  assert json.loads(captured.out.strip().splitlines()[-1])["identity_record_disagreements"] == 2
  assert "warning: " in captured.err and "2 of 8 images" in captured.err
  assert prepare.main(["--format=recordio", f"--src={rec}", f"--data_dir={data_dir}",
                       "--name=glint_strict", "--strict_identity_records"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "disagrees" in err


def test_prepare_usage_errors_are_one_line(tmp_path, capsys):
  for argv, expected in [
      (["--src=x", "--data_dir=y"], "--format"),
      (["--format=recordio", "--src=x", "--data_dir=y", "--bogus"], "bogus"),
      (["--format=recordio", "--src=x", "--data_dir=y", "extra"], "unexpected arguments"),
      (["--format=recordio", "--src=x", "--data_dir=y", "--layout=round"], "--layout"),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      prepare.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert expected in err, (argv, err)
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--help"])
  out = capsys.readouterr().out
  assert exit_info.value.code == 0
  for flag in ("--format", "--src", "--data_dir", "--name", "--skip_corrupt", "--layout",
               "--strict_identity_records"):
    assert flag in out
