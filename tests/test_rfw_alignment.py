"""RFW as released: loose crops aligned with their <race>_lmk.txt, by evaluate and by prepare,
and the one resizer: the verification sets read during training hold evaluate's pixels.

The fixture pastes aligned synthetic faces into larger JPEGs at random similarity
transforms and writes the moved template points as RFW's landmarks file does (label
column, tab-separated, /test/data/... paths). About 25 s: two small TFDS preparations and
one compilation of the tiny model's embedding function.
"""

import os
import shutil

import numpy as np
import pytest
from skimage.transform import SimilarityTransform

import data_fixtures as fx
from mstkd_jax import evaluate as evaluate_lib
from mstkd_jax.data import pairs, prepared, synthetic, tfds_input
from mstkd_jax.formats import align, prepare
from mstkd_jax.formats.images import decode_image
from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_checkpoint
from test_evaluate import ARCH, BATCH, _random_variables

SPEC = synthetic.SyntheticSpec(num_groups=2, identities_per_group=2, images_per_identity=1,
                               eval_identities_per_group=6, eval_images_per_identity=4,
                               pairs_per_group=40, image_size=112)
IMAGES_PER_GROUP = 24  # 6 identities x 4 images, every one in some pair


@pytest.fixture(scope="module")
def rfw(tmp_path_factory):
  """The synthetic test pairs as an aligned RFW folder (112x112) and as its loose copy."""
  root = tmp_path_factory.mktemp("rfw")
  synthetic.export_rfw(synthetic.generate(SPEC), root / "aligned")
  transforms = fx.loosen_rfw(str(root / "aligned"), str(root / "loose"))
  return {"root": root, "aligned": str(root / "aligned"), "loose": str(root / "loose"),
          "transforms": transforms}


def _plans(path):
  return {p.name: p for p in pairs.PLANNERS["rfw"].plan(path)}


def _name(path):
  """<id>/<file> of an RFW image path."""
  return "/".join(path.split(os.sep)[-2:])


def test_landmark_lines_are_read_label_column_and_all(rfw):
  """Each image's points are the template moved by its own transform (the label column is
  not taken for x1): equal to the written 3 decimals."""
  for group, plan in _plans(rfw["loose"]).items():
    assert plan.landmarks_file.endswith(os.path.join("txts", group, f"{group}_lmk.txt"))
    assert len(plan.landmarks) == len(plan.images) == IMAGES_PER_GROUP
    for points, (_, path) in zip(plan.landmarks, plan.images):
      moved = SimilarityTransform(matrix=rfw["transforms"][(group, _name(path))])
      np.testing.assert_allclose(points, moved(fx.ARCFACE_TEMPLATE_112), atol=5e-4)
  # The aligned folder has no landmarks file: its images come as they are.
  assert all(p.landmarks is None for p in _plans(rfw["aligned"]).values())


def test_loose_crops_come_back_aligned(rfw):
  """Aligned from the loose crop, a face matches its aligned original far better than the
  loose crop merely resized does (the old behaviour). The residual is two bilinear
  resamplings and two JPEG encodings of the same face; bounded here by a quarter of the
  unaligned error and by 6 levels mean absolute difference."""
  aligned = _plans(rfw["aligned"])
  for group, plan in _plans(rfw["loose"]).items():
    decoded = pairs.decode(plan, 112)
    assert (decoded.aligned, decoded.taken_as_aligned) == (IMAGES_PER_GROUP, 0)
    assert decoded.resized == []  # aligned straight to 112x112
    original = pairs.decode(aligned[group], 112).vset.images.astype(np.float64)
    unaligned = pairs.decode(pairs.GroupPlan(group, plan.images, plan.pairs, plan.issame),
                             112)
    back = np.abs(decoded.vset.images - original).mean()
    before = np.abs(unaligned.vset.images - original).mean()
    print(f"{group}: mean |aligned back - original| {back:.2f}, unaligned {before:.2f}")
    assert back < 6.0 and back < before / 4, (back, before)
    np.testing.assert_array_equal(decoded.vset.pairs, aligned[group].pairs)


def test_aligned_112_images_with_a_landmarks_file_are_taken_as_aligned(rfw, tmp_path):
  folder = tmp_path / "aligned_with_lmk"
  shutil.copytree(rfw["aligned"], folder)
  for group in SPEC.group_names:
    shutil.copy(os.path.join(rfw["loose"], "test", "txts", group, f"{group}_lmk.txt"),
                folder / "test" / "txts" / group)
  for group, plan in _plans(str(folder)).items():
    decoded = pairs.decode(plan, 112)
    assert (decoded.aligned, decoded.taken_as_aligned) == (0, IMAGES_PER_GROUP)
    np.testing.assert_array_equal(decoded.vset.images,
                                  pairs.decode(_plans(rfw["aligned"])[group]).vset.images)


def test_a_landmarks_file_without_an_image_of_the_pairs_is_refused(rfw, tmp_path):
  folder = tmp_path / "loose"
  shutil.copytree(rfw["loose"], folder)
  lmk = folder / "test" / "txts" / "group_b" / "group_b_lmk.txt"
  lines = lmk.read_text().splitlines()
  lmk.write_text("\n".join(lines[1:]) + "\n")
  with pytest.raises(UserError, match=f"{lmk}: no landmarks for 1 of the 24 images"):
    pairs.PLANNERS["rfw"].plan(str(folder))


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
  """A tiny random iresnet18 (16x16 input) as a .pth."""
  path = tmp_path_factory.mktemp("model") / "tiny.pth"
  torch_checkpoint.save_state_dict(path, torch_checkpoint.export_iresnet(_random_variables()))
  return str(path)


def test_evaluate_aligns_the_release_and_says_so(rfw, pth, tmp_path, capsys):
  report = evaluate_lib.evaluate(pth, ARCH, [rfw["loose"]], str(tmp_path / "eval"),
                                 batch_size=BATCH)
  err = capsys.readouterr().err
  (record,) = report["config"]["data"]
  for group in SPEC.group_names:
    assert record["alignment"][group] == {
        "landmarks": os.path.join(rfw["loose"], "test", "txts", group, f"{group}_lmk.txt"),
        "aligned": IMAGES_PER_GROUP, "taken_as_aligned": 0}
    assert f"group {group}: {IMAGES_PER_GROUP} images aligned to 112x112" in err
  # Aligned to 112, then resized to the model's 16 by the one resizer, with one warning.
  assert record["resized_from"] == [[112, 112]] and err.count("warning: ") == 1
  # Without its landmarks file the folder is taken as aligned faces, and the resize
  # warning says what that means for loose crops.
  bare = tmp_path / "bare"
  shutil.copytree(rfw["loose"], bare)
  for group in SPEC.group_names:
    os.remove(bare / "test" / "txts" / group / f"{group}_lmk.txt")
  report = evaluate_lib.evaluate(pth, ARCH, [str(bare)], str(tmp_path / "bare_eval"),
                                 batch_size=BATCH)
  err = capsys.readouterr().err
  assert report["config"]["data"][0]["alignment"].startswith("none")
  (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
  assert "240x240" in warning and "_lmk.txt" in warning and "chance" in warning


def test_prepared_rfw_is_aligned_and_training_reads_evaluates_pixels(rfw, tmp_path):
  """prepare --format=rfw stores the loose crops aligned (at 112, or resized with
  --image_size), and the sets read during training equal what evaluate decodes from the
  same folder at the model's size, pixel for pixel, resized at load time or at prepare
  time."""
  data_dir = str(tmp_path / "prepared")
  logs = []
  summary = prepare.prepare("rfw", rfw["loose"], data_dir, name="loose", log=logs.append)
  small = prepare.prepare("rfw", rfw["loose"], data_dir, name="loose16", image_size=16,
                          log=logs.append)
  for out, size in ((summary, None), (small, 16)):
    assert out["image_size"] == size
    assert {g: a["aligned"] for g, a in out["alignment"].items()} == {
        g: IMAGES_PER_GROUP for g in SPEC.group_names}
  assert sum("images aligned to 112x112" in line for line in logs) == 4
  assert prepared.read_metadata(summary["path"])["image_sizes"] == [[112, 112]]
  assert prepared.read_metadata(small["path"])["image_sizes"] == [[16, 16]]
  plans = _plans(rfw["loose"])
  for name in ("loose", "loose16"):
    sets = tfds_input.load_verification_sets(name, data_dir, 16)
    for group, (images, rows, issame) in sets.items():
      want = pairs.decode(plans[group], 16).vset
      np.testing.assert_array_equal(images, want.images)
      np.testing.assert_array_equal(rows, want.pairs)
      np.testing.assert_array_equal(issame, want.issame)
  # At 112 the prepared images are the aligned ones themselves (PNG, lossless).
  stored = tfds_input.load_verification_sets("loose", data_dir, 112)
  for group, plan in plans.items():
    np.testing.assert_array_equal(stored[group].images, pairs.decode(plan, 112).vset.images)
  with pytest.raises(UserError, match="--image_size=20; expected a multiple of 16"):
    prepare.prepare("rfw", rfw["loose"], data_dir, name="bad", image_size=20)


def test_align_reads_an_rfw_landmarks_file(rfw, tmp_path, capsys):
  """formats.align with RFW's own landmarks file, names /test/data/<group>/... against
  --src=test/data/<group>: the faces come back as evaluate aligns them."""
  group = SPEC.group_names[0]
  src = os.path.join(rfw["loose"], "test", "data", group)
  lmk = os.path.join(rfw["loose"], "test", "txts", group, f"{group}_lmk.txt")
  assert align.main([f"--src={src}", f"--landmarks={lmk}", f"--dst={tmp_path / 'out'}"]) == 0
  capsys.readouterr()
  plan = _plans(rfw["loose"])[group]
  decoded = pairs.decode(plan, 112).vset.images
  for row, (_, path) in enumerate(plan.images):
    written = tmp_path / "out" / (os.path.splitext(_name(path))[0] + ".png")
    np.testing.assert_array_equal(decode_image(written.read_bytes(), str(written)),
                                  decoded[row])
