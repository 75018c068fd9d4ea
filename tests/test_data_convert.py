"""Tests for the format converters and their command line."""

import json
import os
import subprocess
import sys

import pytest

import data_fixtures as fx
from mstkd_jax.formats import convert
from mstkd_jax.formats import image_tree
from mstkd_jax.formats.recordio import face_pack, identities
from mstkd_jax.formats import verification_bin
from mstkd_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _triples(records, index):
  return [(index.identity_key(r.identity), r.identity, r.image) for r in records]


def test_tree_rec_tree_round_trip(tmp_path):
  tree = fx.make_image_tree(str(tmp_path / "bupt"))
  src = image_tree.ImageTreeReader(str(tmp_path / "bupt"))
  from_tree = _triples(src, src.index)
  summary = convert.tree_to_rec(str(tmp_path / "bupt"), str(tmp_path / "rec"))
  assert summary["groups"] == src.index.group_counts()
  assert summary["images"] == 11 and summary["identities"] == 6 and summary["skipped"] == []
  assert (tmp_path / "rec" / "property").read_text() == "6,12,12\n"

  with face_pack.FaceRecordIOReader(str(tmp_path / "rec" / "train.rec")) as rec:
    assert rec.index == image_tree.DatasetIndex(
        src.index.group_names, src.index.identity_names, src.index.identity_groups,
        src.index.identity_image_counts, rec.rec_path)
    records = list(rec)
    assert _triples(records, rec.index) == from_tree
    assert [r.group for r in records] == [r.group for r in src]

  summary = convert.rec_to_tree(str(tmp_path / "rec"), str(tmp_path / "back"))
  assert summary["labels_preserved"] and summary["written"] == 11
  back = image_tree.ImageTreeReader(str(tmp_path / "back"))
  assert back.index.identity_names == src.index.identity_names
  assert back.index.summary() == src.index.summary()
  assert _triples(back, back.index) == from_tree
  # Every original image comes back byte for byte (PNGs stay PNGs).
  labels = fx.expected_labels(tree)
  assert [r.image for r in back] == [img for _, _, imgs in labels for img in imgs]
  assert not os.path.exists(str(tmp_path / "back.partial"))


def test_rec_without_names_to_tree_keeps_labels(tmp_path):
  ids = [[fx.jpeg_bytes(i)] for i in range(11)]
  ids[3].append(fx.png_bytes(99))
  fx.write_rec_fixture(str(tmp_path / "x.rec"), ids)
  summary = convert.rec_to_tree(str(tmp_path / "x.rec"), str(tmp_path / "tree"))
  assert summary["labels_preserved"]
  back = image_tree.ImageTreeReader(str(tmp_path / "tree"))
  assert not back.grouped
  assert back.index.identity_names[:3] == ("00", "01", "02")
  assert [(r.identity, r.image) for r in back] == [
      (j, img) for j, imgs in enumerate(ids) for img in imgs]


def test_tree_to_rec_flat_tree_and_rec_path(tmp_path):
  fx.make_image_tree(str(tmp_path / "flat"), {"g": [("b", 2, False), ("a", 1, True)]},
                     grouped=False)
  summary = convert.tree_to_rec(str(tmp_path / "flat"), str(tmp_path / "out" / "faces.rec"))
  assert summary["identities"] == 2 and summary["property"] is None
  assert sorted(os.listdir(tmp_path / "out")) == ["faces.identities.json", "faces.idx",
                                                  "faces.rec"]
  with face_pack.FaceRecordIOReader(str(tmp_path / "out" / "faces.rec")) as rec:
    assert rec.index.identity_names == ("a", "b") and rec.index.group_names == ()
    assert [r.identity for r in rec] == [0, 1, 1]


def test_tree_to_rec_corrupt_image(tmp_path):
  fx.make_image_tree(str(tmp_path / "bupt"))
  bad = tmp_path / "bupt" / "Asian" / "x1" / "img_00.jpg"
  bad.write_bytes(bad.read_bytes()[:60])
  with pytest.raises(UserError, match=r"x1.img_00\.jpg: not a decodable"):
    convert.tree_to_rec(str(tmp_path / "bupt"), str(tmp_path / "rec"))
  assert os.listdir(tmp_path / "rec") == []  # No half-written files are left.
  summary = convert.tree_to_rec(str(tmp_path / "bupt"), str(tmp_path / "rec"),
                                skip_corrupt=True)
  assert summary["skipped"] == [str(bad)] and summary["images"] == 10
  with face_pack.FaceRecordIOReader(str(tmp_path / "rec" / "train.rec")) as rec:
    assert rec.index.identity_image_counts == (1, 2, 2, 0, 3, 2)
    assert rec.index.identity_key(3) == "Asian/x1"
  with pytest.raises(UserError, match=r"train\.rec: already exists"):
    convert.tree_to_rec(str(tmp_path / "bupt"), str(tmp_path / "rec"), skip_corrupt=True)
  summary = convert.rec_to_tree(str(tmp_path / "rec"), str(tmp_path / "back"))
  # Asian/x1 lost its only image, so the tree cannot keep the labels; it says so.
  assert summary["empty_identities"] == ["Asian/x1"] and not summary["labels_preserved"]


def test_rec_to_tree_refuses_nonempty_dst(tmp_path):
  fx.write_rec_fixture(str(tmp_path / "train.rec"), [[fx.jpeg_bytes(1)]])
  (tmp_path / "dst").mkdir()
  (tmp_path / "dst" / "keep.txt").write_text("x")
  with pytest.raises(UserError, match=r"dst: already exists and is not an empty folder"):
    convert.rec_to_tree(str(tmp_path), str(tmp_path / "dst"))


def test_rec_to_tree_refuses_unsafe_names(tmp_path):
  fx.write_rec_fixture(str(tmp_path / "train.rec"), [[fx.jpeg_bytes(1)]])
  (tmp_path / "train.identities.json").write_text(json.dumps(
      {"format": identities.NAMES_FORMAT, "version": 1, "groups": [],
       "identities": [["../escape", -1]]}))
  with pytest.raises(UserError, match=r"identity name .\.\./escape. cannot be a folder name"):
    convert.rec_to_tree(str(tmp_path / "train.rec"), str(tmp_path / "dst"))
  (tmp_path / "train.identities.json").write_text('{"format": "other"}')
  with pytest.raises(UserError, match=r"train\.identities\.json: malformed identity names"):
    convert.rec_to_tree(str(tmp_path / "train.rec"), str(tmp_path / "dst"))


def test_rfw_to_bin(tmp_path):
  expected = fx.make_rfw(str(tmp_path / "RFW"))
  summary = convert.rfw_to_bin(str(tmp_path / "RFW"), str(tmp_path / "bins"))
  assert sorted(os.listdir(tmp_path / "bins")) == ["African_test.bin", "Asian_test.bin"]
  assert summary["groups"]["Asian"]["pairs"] == 4 and summary["groups"]["Asian"]["same"] == 2
  for group, pairs in expected.items():
    images, issame = verification_bin.load_verification_bin(
        str(tmp_path / "bins" / f"{group}_test.bin"))
    assert issame == [same for _, _, same in pairs]
    assert images == [img for a, b, _ in pairs for img in (a, b)]
  with pytest.raises(UserError, match=r"African_test\.bin: already exists"):
    convert.rfw_to_bin(str(tmp_path / "RFW"), str(tmp_path / "bins"), groups=["African"])


def test_cli(tmp_path, capsys):
  fx.make_image_tree(str(tmp_path / "bupt"))
  assert convert.main(["tree_to_rec", f'--src={tmp_path / "bupt"}',
                       f'--dst={tmp_path / "rec"}']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["groups"]["Indian"] == {"images": 5, "identities": 2}
  assert convert.main(["rec_to_tree", "--src", str(tmp_path / "rec" / "train.rec"),
                       "--dst", str(tmp_path / "back")]) == 0
  assert json.loads(capsys.readouterr().out)["labels_preserved"]
  assert convert.main(["rfw_to_bin", f'--src={tmp_path / "none"}', f"--dst={tmp_path}"]) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("error: ") and "none: RFW folder does not exist" in captured.err
  assert "Traceback" not in captured.err


def test_cli_module_entry_point(tmp_path):
  fx.make_rfw(str(tmp_path / "RFW"))
  result = subprocess.run(
      [sys.executable, "-m", "mstkd_jax.formats.convert", "rfw_to_bin", f'--src={tmp_path / "RFW"}',
       f'--dst={tmp_path / "bins"}', "--groups=Asian"],
      cwd=_REPO, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert list(json.loads(result.stdout)["groups"]) == ["Asian"]
  assert os.listdir(tmp_path / "bins") == ["Asian_test.bin"]


def test_rec_to_tree_uses_image_labels_of_a_glint_like_pack(tmp_path, capsys):
  ids = [[fx.jpeg_bytes(30 + k) for k in range(n)] for n in (2, 2, 2)]
  # Keys: identity 0 -> 1..2, 1 -> 3..4, 2 -> 5..6; key 4's own label is 0.
  fx.write_rec_fixture(str(tmp_path / "train.rec"), ids, image_label_override={4: 0})
  summary = convert.rec_to_tree(str(tmp_path), str(tmp_path / "tree"))
  err = capsys.readouterr().err  # Our one-line warning, no source line echoed.
  assert err.startswith("warning: ") and err.count("\n") == 1 and "1 of 6 images" in err
  assert summary["identity_record_disagreements"] == 1 and summary["written"] == 6
  back = image_tree.ImageTreeReader(str(tmp_path / "tree"))
  assert [(r.identity, r.image) for r in back] == [
      (0, ids[0][0]), (0, ids[0][1]), (0, ids[1][1]), (1, ids[1][0]), (2, ids[2][0]),
      (2, ids[2][1])]
  # The command line: one warning line, the count in the JSON; --strict_identity_records
  # refuses in one line.
  assert convert.main(["rec_to_tree", f"--src={tmp_path}", f'--dst={tmp_path / "cli"}']) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["identity_record_disagreements"] == 1
  warning_lines = [l for l in captured.err.splitlines() if l.startswith("warning: ")]
  assert len(warning_lines) == 1 and "1 of 6 images" in warning_lines[0]
  assert convert.main(["rec_to_tree", f"--src={tmp_path}", f'--dst={tmp_path / "strict"}',
                       "--strict_identity_records"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "train.rec#4: image label 0 disagrees with identity record 1" in err
  assert not os.path.exists(tmp_path / "strict")


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
  cases = [
      ([], "command none; expected one of rfw_to_bin, tree_to_rec, rec_to_tree"),
      (["zip_to_rec", "--src=a", "--dst=b"], "command 'zip_to_rec'"),
      (["tree_to_rec", "--src=a"], "--dst"),
      (["tree_to_rec", "--src=a", "--dst=b", "--layout=round"], "--layout=round"),
      (["rfw_to_bin", "--src=a", "--dst=b", "--skip_corrupt"], "skip_corrupt"),
      (["rec_to_tree", "--src=a", "--dst=b", "stray"], "unexpected arguments ['stray']"),
  ]
  for argv, expected in cases:
    with pytest.raises(SystemExit) as exit_info:
      convert.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, argv
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (argv, err)
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["tree_to_rec", "--help"])
  assert exit_info.value.code == 0 and "--skip_corrupt" in capsys.readouterr().out


def test_cli_flags_keep_their_meaning(tmp_path, capsys):
  fx.make_image_tree(str(tmp_path / "flat"), {"g": [("b", 2, False), ("a", 1, True)]},
                     grouped=False)
  bad = tmp_path / "flat" / "a" / "img_00.png"
  bad.write_bytes(b"not a png")
  args = ["tree_to_rec", "--src", str(tmp_path / "flat"), "--dst", str(tmp_path / "rec"),
          "--layout=flat"]
  assert convert.main(args) == 1
  assert "img_00.png: not a decodable" in capsys.readouterr().err
  assert convert.main(args + ["--skip_corrupt"]) == 0
  assert json.loads(capsys.readouterr().out)["skipped"] == [str(bad)]
  assert convert.main(args + ["--skip_corrupt"]) == 1
  assert "pass --overwrite" in capsys.readouterr().err
  assert convert.main(args + ["--no_validate", "--overwrite"]) == 0
  assert json.loads(capsys.readouterr().out)["images"] == 3
