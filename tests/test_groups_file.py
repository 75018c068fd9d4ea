"""A stock train.rec has no demographic groups: `prepare --groups=FILE` names them, and a
group asked of a data set without groups says how to give them."""

import json
import os

import numpy as np
import pytest

import data_fixtures as fx
from mstkd_jax.data import sources, tfds_input
from mstkd_jax.formats import groups, prepare
from mstkd_jax.errors import UserError

# Five identities (labels 0..4) with 2, 1, 3, 2, 1 images; their groups by label.
COUNTS = (2, 1, 3, 2, 1)
GROUP_OF = {0: "Asian", 1: "African", 2: "Asian", 3: "Indian", 4: "African"}


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
  root = tmp_path_factory.mktemp("rec")
  ids = [[fx.jpeg_bytes(100 + 10 * label + k) for k in range(n)]
         for label, n in enumerate(COUNTS)]
  fx.write_rec_fixture(str(root / "train.rec"), ids)
  return root


def _write_groups(root):
  """The same groups as CSV (labels zero-padded, with a header), JSON {group: [ids]} and a
  folder of per-group lists."""
  csv = root / "groups.csv"
  csv.write_text("identity,group\n" + "".join(f"{label:05d},{g}\n"
                                               for label, g in GROUP_OF.items()))
  by_group = {}
  for label, group in GROUP_OF.items():
    by_group.setdefault(group, []).append(label)
  as_json = root / "groups.json"
  as_json.write_text(json.dumps(by_group))
  folder = root / "lists"
  folder.mkdir()
  for group, labels in by_group.items():
    (folder / f"{group}.txt").write_text("".join(f"{label}\n" for label in labels))
  return csv, as_json, folder


def test_prepare_takes_each_identitys_group_from_a_file(rec, tmp_path):
  data_dir = str(tmp_path / "prepared")
  plain = prepare.prepare("recordio", str(rec / "train.rec"), data_dir, name="plain",
                          log=lambda _: None)
  assert plain["groups"] == {}
  face_set = sources.TfdsTrainingSet("plain", data_dir, 12)
  # The refusal names the way out.
  with pytest.raises(UserError, match=r"group 'African': this data set has no demographic "
                                      r"groups .*prepare .* --groups=FILE"):
    sources.select(face_set, group="African")
  want = {"African": {"images": 2, "identities": 2}, "Asian": {"images": 5, "identities": 2},
          "Indian": {"images": 2, "identities": 1}}
  for k, path in enumerate(_write_groups(tmp_path)):
    out = prepare.prepare("recordio", str(rec / "train.rec"), data_dir, name=f"grouped{k}",
                          groups=str(path), log=lambda _: None)
    assert out["groups"] == want, path
    face_set = tfds_input.load_face_dataset(f"grouped{k}", data_dir)
    assert face_set.group_names == ("African", "Asian", "Indian")
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    np.testing.assert_array_equal(face_set.identity, labels)
    np.testing.assert_array_equal(
        face_set.group, [face_set.group_names.index(GROUP_OF[i]) for i in labels])
  # A teacher's group now selects its identities, relabelled 0..K-1.
  rows, new_labels = sources.select(sources.TfdsTrainingSet("grouped0", data_dir, 12),
                                    group="African")
  np.testing.assert_array_equal(rows, [2, 8])  # label 1's image, label 4's image
  np.testing.assert_array_equal(new_labels, [0, 1])


def test_a_groups_file_that_leaves_identities_out_is_refused(rec, tmp_path):
  partial = tmp_path / "partial.csv"
  partial.write_text("0,Asian\n1,African\n99,Indian\n")
  with pytest.raises(UserError, match=r"partial.csv: no group for 3 of the 5 identities of "
                                      r"the data set \(2, 3, 4\)"):
    prepare.prepare("recordio", str(rec / "train.rec"), str(tmp_path / "p"), name="x",
                    groups=str(partial), log=lambda _: None)
  assert not os.listdir(tmp_path / "p" / "mstkd_faces" / "x")  # Nothing half-built.
  # Extra names are counted in a warning; two groups for one identity are refused.
  extra = tmp_path / "extra.csv"
  extra.write_text("".join(f"{label},{g}\n" for label, g in GROUP_OF.items()) + "99,Indian\n")
  logs = []
  prepare.prepare("recordio", str(rec / "train.rec"), str(tmp_path / "p"), name="y",
                  groups=str(extra), log=logs.append)
  assert any(line.startswith("warning: ") and "1 of its identities are not in the data set"
             in line for line in logs)
  twice = tmp_path / "twice.csv"
  twice.write_text("0,Asian\n0,African\n")
  with pytest.raises(UserError, match=r"twice.csv line 2: identity '0' is given group "
                                      r"'African' and also 'Asian'"):
    groups.read_groups_file(str(twice))
  with pytest.raises(UserError, match="names the groups of a training set"):
    prepare.prepare("bin", str(rec), str(tmp_path / "p"), groups=str(extra))


def test_the_command_line_takes_groups(rec, tmp_path, capsys):
  csv, _, _ = _write_groups(tmp_path)
  assert prepare.main(["--format=recordio", f"--src={rec}", f"--data_dir={tmp_path / 'p'}",
                       f"--groups={csv}", "--name=cli"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(out["groups"]) == {"African", "Asian", "Indian"}
