"""Prepared TFDS data: the builders, `python -m mstkd_jax.formats.prepare`, and tfds_input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
from mstkd_jax.formats import convert
from mstkd_jax.formats import faces
from mstkd_jax.data import input_pipeline
from mstkd_jax.formats import prepare
from mstkd_jax.data import tfds_input
from mstkd_jax.formats.images import decode_image
from mstkd_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE_GROUPS = {"African": {"images": 5, "identities": 3}, "Asian": {"images": 1, "identities": 1},
               "Indian": {"images": 5, "identities": 2}}


def _flipped(images, flips):
  images = images.copy()
  images[flips] = images[flips][:, :, ::-1]
  return images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Sources in every format, prepared once: tree, rec, rfw in-process, bins by the CLI."""
  root = tmp_path_factory.mktemp("tfds")
  tree = fx.make_image_tree(str(root / "tree"))
  convert.tree_to_rec(str(root / "tree"), str(root / "rec"))
  rfw_pairs = fx.make_rfw(str(root / "RFW"))
  os.makedirs(root / "bins")
  for group, pairs in rfw_pairs.items():
    fx.write_bin_fixture(str(root / "bins" / f"{group}_test.bin"),
                         [img for a, b, _ in pairs for img in (a, b)], [s for _, _, s in pairs])
  data_dir = str(root / "prepared")
  logs = []
  summaries = {
      "tree": prepare.prepare("image_tree", str(root / "tree"), data_dir, log=logs.append),
      "rec": prepare.prepare("recordio", str(root / "rec" / "train.rec"), data_dir,
                             name="rec", log=logs.append),
      "rfw": prepare.prepare("rfw", str(root / "RFW"), data_dir, log=logs.append),
  }
  cli = subprocess.run(
      [sys.executable, "-m", "mstkd_jax.formats.prepare", "--format=bin",
       f'--src={root / "bins"}', f"--data_dir={data_dir}"],
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  return {"root": root, "tree": tree, "rfw_pairs": rfw_pairs, "data_dir": data_dir,
          "summaries": summaries, "cli": cli, "logs": logs}


def test_prepare_summaries_count_from_the_data(data):
  tree = data["summaries"]["tree"]
  assert tree["name"] == "tree" and tree["num_images"] == 11 and tree["num_identities"] == 6
  assert tree["groups"] == TREE_GROUPS and tree["skipped"] == 0
  rec = data["summaries"]["rec"]
  assert {k: rec[k] for k in ("num_images", "num_identities", "groups")} == {
      k: tree[k] for k in ("num_images", "num_identities", "groups")}
  rfw = data["summaries"]["rfw"]
  assert rfw["groups"] == {"African": {"images": 5, "identities": 2, "pairs": 3, "same": 2},
                           "Asian": {"images": 5, "identities": 3, "pairs": 4, "same": 2}}
  assert any("preparing" in line for line in data["logs"])


def test_cli_prints_one_json_line(data):
  cli = data["cli"]
  assert cli.returncode == 0, cli.stderr
  lines = cli.stdout.strip().splitlines()
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out["name"] == "bins" and out["num_images"] == 10 and out["num_identities"] is None
  assert {g: v["pairs"] for g, v in out["groups"].items()} == {"African": 3, "Asian": 4}


def test_second_run_says_it_exists(data, capsys):
  args = ["--format=image_tree", f'--src={data["root"] / "tree"}',
          f'--data_dir={data["data_dir"]}']
  assert prepare.main(args) == 0
  captured = capsys.readouterr()
  assert "already prepared" in captured.err
  assert json.loads(captured.out) == data["summaries"]["tree"]


def _raw_images(face_set):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = face_set.raw_source().__getitems__(list(range(face_set.num_examples)))
  return [tf.train.Example.FromString(r).features.feature["image"].bytes_list.value[0]
          for r in records]


def test_tree_and_recordio_give_the_same_data(data):
  expected = fx.expected_labels(data["tree"])
  want_identity = [label for label, (_, _, imgs) in enumerate(expected) for _ in imgs]
  want_images = [img for _, _, imgs in expected for img in imgs]
  sets = [tfds_input.load_face_dataset(name, data["data_dir"]) for name in ("tree", "rec")]
  for face_set in sets:
    assert face_set.num_examples == 11 and face_set.group_names == ("African", "Asian", "Indian")
    assert face_set.identity_names == tuple(n for _, n, _ in expected)
    np.testing.assert_array_equal(face_set.identity, want_identity)
    np.testing.assert_array_equal(face_set.group, face_set.identity_groups()[want_identity])
    assert _raw_images(face_set) == want_images  # Stored byte for byte.
  # Plain TFDS users get decoded images.
  example = sets[1].builder.as_data_source("train")[3]
  np.testing.assert_array_equal(example["image"], decode_image(want_images[3], "x"))


def _batches(face_set, rows, labels, start=0, total=6, **kwargs):
  settings = dict(global_batch=4, steps_per_epoch=2, seed=3, start_step=start,
                  total_steps=total, image_size=12, local_device_count=2, process_index=0,
                  process_count=1)
  settings.update(kwargs)
  return list(tfds_input.train_batches(face_set, rows, labels, **settings))


@pytest.fixture(scope="module")
def tree_set(data):
  face_set = tfds_input.load_face_dataset("tree", data["data_dir"])
  images = np.stack([decode_image(img, "x") for _, _, imgs in fx.expected_labels(data["tree"])
                     for img in imgs])
  rows = np.flatnonzero(face_set.group != 1)  # African and Indian: 10 rows.
  labels = np.unique(face_set.identity[rows], return_inverse=True)[1].astype(np.int32)
  return face_set, images, rows, labels


def test_train_batches_equal_the_in_memory_pipeline(tree_set):
  face_set, images, rows, labels = tree_set
  ours = _batches(face_set, rows, labels, total=5)
  ref = list(input_pipeline.train_batches(
      {"image": images[rows], "label": labels}, global_batch=4, steps_per_epoch=2, seed=3,
      start_step=0, total_steps=5, local_device_count=2, process_index=0, process_count=1))
  for a, b in zip(ours, ref, strict=True):
    assert a["image"].shape == (2, 2, 12, 12, 3) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["index"], rows[b["index"]])
    for key in ("label", "flip", "image"):
      np.testing.assert_array_equal(a[key], b[key])
    flat = a["index"].reshape(-1)
    np.testing.assert_array_equal(a["image"].reshape(-1, 12, 12, 3),
                                  _flipped(images[flat], a["flip"].reshape(-1)))


def test_epochs_determinism_resumption_and_hosts(tree_set):
  face_set, _, rows, labels = tree_set
  rows, labels = rows[:8], labels[:8]
  full = _batches(face_set, rows, labels, total=6)
  epochs = [np.concatenate([b["index"].reshape(-1) for b in full[e * 2:(e + 1) * 2]])
            for e in range(3)]
  for order in epochs:
    assert sorted(order) == sorted(rows)
  assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])
  again = _batches(face_set, rows, labels, total=6)
  resumed = _batches(face_set, rows, labels, start=3, total=6)
  for a, b in zip(full, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(full[3:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  single = _batches(face_set, rows, labels, total=3, local_device_count=1)
  hosts = [_batches(face_set, rows, labels, total=3, local_device_count=1, process_index=p,
                    process_count=2) for p in range(2)]
  for step in range(3):
    for key in ("index", "flip", "label", "image"):
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]], axis=1)
      np.testing.assert_array_equal(joined, single[step][key])
  assert not any(b["flip"].any() for b in _batches(face_set, rows, labels, total=2,
                                                   flip=False))


def test_other_image_size_is_resized_with_a_warning(tree_set, capsys):
  face_set, images, rows, labels = tree_set
  batch = _batches(face_set, rows, labels, total=1, image_size=8)[0]
  out = capsys.readouterr().out  # One line of ours, no source line echoed.
  warned = [line for line in out.splitlines() if "differ from the requested (8, 8)" in line]
  assert len(warned) == 1 and warned[0].startswith("warning: ") and "--image_size=8" in out
  assert batch["image"].shape == (2, 2, 8, 8, 3) and batch["image"].dtype == np.uint8
  # Training sees exactly the resized pixels extraction embeds (so cached targets match),
  # and they are the one resizer's (formats/faces.py), as evaluate's and prepare's.
  stored = np.concatenate(list(tfds_input.ordered_images(face_set, 8, chunk=4)))
  np.testing.assert_array_equal(stored, np.stack([faces.resize_image(i, 8) for i in images]))
  fed = batch["image"].reshape(-1, 8, 8, 3)
  for image, index, flip in zip(fed, batch["index"].reshape(-1), batch["flip"].reshape(-1)):
    want = stored[index][:, ::-1] if flip else stored[index]
    np.testing.assert_array_equal(image, want)


@pytest.mark.parametrize("name", ["rfw", "bins"])
def test_verification_sets_hold_the_source_pairs(data, name):
  sets = tfds_input.load_verification_sets(name, data["data_dir"], 12)
  assert list(sets) == ["African", "Asian"]
  for group, (images, pairs, issame) in sets.items():
    want = data["rfw_pairs"][group]
    assert images.dtype == np.uint8 and pairs.dtype == np.int32 and issame.dtype == bool
    assert len(images) == 5  # Distinct images only, though pairs (and .bin) repeat some.
    np.testing.assert_array_equal(issame, [s for _, _, s in want])
    for (a, b), (img_a, img_b, _) in zip(pairs, want, strict=True):
      np.testing.assert_array_equal(images[a], decode_image(img_a, "a"))
      np.testing.assert_array_equal(images[b], decode_image(img_b, "b"))


def test_missing_sources_and_data_sets_are_named(data, tmp_path, capsys):
  missing = tmp_path / "no_such_tree"
  assert prepare.main(["--format=image_tree", f"--src={missing}",
                       f'--data_dir={tmp_path / "out"}']) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--format=zip", "--src=x", "--data_dir=y"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
  with pytest.raises(UserError, match="no prepared data set .nope.*mstkd_jax.formats.prepare"):
    tfds_input.load_face_dataset("nope", data["data_dir"])
  with pytest.raises(UserError, match="prepared as a mstkd_verification"):
    tfds_input.load_face_dataset("rfw", data["data_dir"])


def test_corrupt_images_stop_or_are_skipped(data, tmp_path):
  tree = tmp_path / "tree"
  shutil.copytree(data["root"] / "tree", tree)
  bad = tree / "Indian" / "n_zeta" / "img_01.jpg"
  bad.write_bytes(bad.read_bytes()[:60])
  data_dir = str(tmp_path / "prepared")
  with pytest.raises(UserError, match=str(bad)):
    prepare.prepare("image_tree", str(tree), data_dir, log=lambda _: None)
  assert not os.listdir(os.path.join(data_dir, "mstkd_faces", "tree"))  # Nothing half-built.
  logs = []
  out = prepare.prepare("image_tree", str(tree), data_dir, skip_corrupt=True, log=logs.append)
  assert out["skipped"] == 1 and out["num_images"] == 10 and out["num_identities"] == 6
  assert any(str(bad) in line for line in logs)
  face_set = tfds_input.load_face_dataset("tree", data_dir)
  np.testing.assert_array_equal(np.bincount(face_set.identity), [1, 2, 2, 1, 3, 1])

  rfw = tmp_path / "RFW"
  shutil.copytree(data["root"] / "RFW", rfw)
  bad = rfw / "test" / "data" / "Asian" / "m.1cc" / "m.1cc_0001.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(UserError, match=str(bad)):
    prepare.prepare("rfw", str(rfw), data_dir, log=lambda _: None)
  out = prepare.prepare("rfw", str(rfw), data_dir, skip_corrupt=True, log=lambda _: None)
  assert out["groups"]["Asian"]["pairs"] == 3 and out["dropped_pairs"] == 1
  images, pairs, issame = tfds_input.load_verification_sets("rfw", data_dir, 12)["Asian"]
  assert len(images) == 4 and pairs.max() == 3 and issame.tolist() == [True, False, True]


def test_images_at_reads_the_given_records_in_their_order(tree_set, data):
  face_set, images, _, _ = tree_set
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  train_set = sources.TfdsTrainingSet("tree", data["data_dir"], images.shape[1])
  rows = np.array([7, 0, 3])
  np.testing.assert_array_equal(train_set.images_at(rows), images[rows])
  assert train_set.images_at(np.array([], np.int64)).shape == (0,) + images.shape[1:]


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _zero_middle(path):
  with open(path, "r+b") as f:
    f.seek(2000)
    f.write(b"\0" * 3000)


@pytest.mark.parametrize("name,file,damage,reason", [
    # A copy cut short: the shard's index (at its end) is gone; found when the set opens.
    ("tree", "mstkd_faces-train.array_record-00000-of-00001",
     lambda p: _truncate(p, 100_000), "RuntimeError: Corrupted Riegeli/records file"),
    ("tree", "dataset_info.json", os.remove, "it is missing"),
    ("tree", "features.json", os.remove, "it is missing"),
    # A damaged record inside a whole shard: found when tf.data reads it.
    ("rfw", "mstkd_verification-test.array_record-00000-of-00001", _zero_middle,
     "record 2: RuntimeError: Corrupted Riegeli/records file"),
])
def test_a_damaged_prepared_set_is_one_line_naming_the_file_and_prepare(
    data, tmp_path, name, file, damage, reason):
  data_dir = str(tmp_path / "prepared")
  shutil.copytree(data["data_dir"], data_dir)
  kind = "mstkd_faces" if name == "tree" else "mstkd_verification"
  folder = os.path.join(data_dir, kind, name, "1.0.0")
  damage(os.path.join(folder, file))
  with pytest.raises(UserError) as info:
    if name == "tree":
      tfds_input.load_face_dataset(name, data_dir)
    else:
      tfds_input.load_verification_sets(name, data_dir, 12)
  message = str(info.value)
  source = data["root"] / ("tree" if name == "tree" else "RFW")
  fmt = "image_tree" if name == "tree" else "rfw"
  assert message.startswith(f"{os.path.join(folder, file)}: the prepared data set {name!r} is "
                            f"damaged ({reason}")
  assert message.endswith(f"; remove {folder} and prepare it again: python -m "
                          f"mstkd_jax.formats.prepare --format={fmt} "
                          f"--src={source} --data_dir={data_dir} --name={name}")
  assert "\n" not in message
