"""data/pairs.py: one planner per verification format, the plans they make, and decoding."""

import os

import numpy as np
from PIL import Image
import pytest

import data_fixtures as fx
from mstkd_jax.data import pairs, prepared, synthetic
from mstkd_jax.formats.images import decode_image
from mstkd_jax.errors import UserError

SPEC = synthetic.SyntheticSpec(num_groups=2, identities_per_group=2, images_per_identity=1,
                               eval_identities_per_group=4, eval_images_per_identity=3,
                               pairs_per_group=10, image_size=16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The RFW fixture, and the same pairs as a folder of .bin files."""
  root = tmp_path_factory.mktemp("pairs")
  expected = fx.make_rfw(str(root / "RFW"))
  os.makedirs(root / "bins")
  for group, rows in expected.items():
    fx.write_bin_fixture(str(root / "bins" / f"{group}_test.bin"),
                         [img for a, b, _ in rows for img in (a, b)], [s for _, _, s in rows])
  return {"root": root, "expected": expected}


def _check_against_source(vset, rows):
  np.testing.assert_array_equal(vset.issame, [s for _, _, s in rows])
  for (a, b), (img_a, img_b, _) in zip(vset.pairs, rows, strict=True):
    np.testing.assert_array_equal(vset.images[a], decode_image(img_a, "a"))
    np.testing.assert_array_equal(vset.images[b], decode_image(img_b, "b"))


@pytest.mark.parametrize("fmt,where", [("rfw", "RFW"), ("bin", "bins")])
def test_rfw_and_bin_plans_hold_the_source_pairs_over_distinct_images(sources, fmt, where):
  source = str(sources["root"] / where)
  assert pairs.PLANNERS[fmt].groups(source) == ("African", "Asian")
  plans = pairs.PLANNERS[fmt].plan(source)
  assert [p.name for p in plans] == ["African", "Asian"]
  for plan in plans:
    assert plan.encoded and plan.pairs.dtype == np.int64 and plan.issame.dtype == bool
    assert len(plan.images) == 5  # Each distinct image once, though pairs repeat some.
    _check_against_source(pairs.decode(plan).vset, sources["expected"][plan.name])


def test_rfw_plans_name_the_identity_of_every_image(sources):
  (african, _) = pairs.PLANNERS["rfw"].plan(str(sources["root"] / "RFW"))
  assert len(african.identities) == len(african.images)
  for identity, (data, path) in zip(african.identities, african.images):
    assert data is None and os.path.basename(os.path.dirname(path)) == identity


def test_bin_groups_are_file_stems_and_one_bin_per_group(sources, tmp_path):
  assert pairs.bin_group_name("x/African_test.bin") == "African"
  assert pairs.bin_group_name("lfw.bin") == "lfw"
  assert pairs.bin_group_name("_test.bin") == "_test"
  single = str(sources["root"] / "bins" / "Asian_test.bin")
  assert pairs.PLANNERS["bin"].groups(single) == ("Asian",)
  for name in ("Asian_test.bin", "Asian.bin"):
    fx.write_file(str(tmp_path / name), open(single, "rb").read())
  with pytest.raises(UserError, match="group name 'Asian' also comes from"):
    pairs.PLANNERS["bin"].groups(str(tmp_path))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="no .bin files in this folder"):
    pairs.PLANNERS["bin"].plan(str(tmp_path / "empty"))


def test_paths_are_claimed_in_registry_order(sources, tmp_path):
  assert pairs.format_of(str(sources["root"] / "RFW")) == "rfw"
  assert pairs.format_of(str(sources["root"] / "RFW" / "test")) == "rfw"
  assert pairs.format_of(str(sources["root"] / "bins" / "Asian_test.bin")) == "bin"
  assert pairs.FILE_FORMATS == prepared.VERIFICATION.formats == ("rfw", "bin")


def test_a_folder_of_bin_files_is_the_bin_format_not_rfw(sources, tmp_path):
  """What `convert rfw_to_bin` writes (a folder of <group>_test.bin) is read as .bin files
  wherever a folder is classified (evaluate's --data); a folder of neither is refused
  naming both."""
  assert pairs.format_of(str(sources["root"] / "bins")) == "bin"
  os.makedirs(tmp_path / "photos")
  fx.write_file(str(tmp_path / "photos" / "a.jpg"), fx.jpeg_bytes(1))
  with pytest.raises(UserError, match="not a verification source; expected the RFW folder "
                                      ".* or an insightface verification .bin file or a "
                                      "folder of them"):
    pairs.format_of(str(tmp_path / "photos"))


def test_synthetic_plans_are_the_generated_arrays_uncopied(tmp_path):
  faces = synthetic.load_or_generate(SPEC, str(tmp_path))
  source = pairs.SyntheticSource(SPEC, str(tmp_path))
  assert pairs.PLANNERS["synthetic"].groups(source) == tuple(SPEC.group_names)
  sets = pairs.load("synthetic", source)
  assert list(sets) == list(SPEC.group_names)
  for group, vset in sets.items():
    want = faces.eval_images[group]
    np.testing.assert_array_equal(vset.images, want)
    np.testing.assert_array_equal(vset.pairs, faces.eval_pairs[group])
    np.testing.assert_array_equal(vset.issame, faces.eval_issame[group])
  # Unpacks as (images, pairs, issame), as the prepared sets do.
  images, pair_rows, issame = sets[SPEC.group_names[0]]
  assert images.shape[1:] == (16, 16, 3) and pair_rows.shape == (10, 2) and issame.shape == (10,)


def test_array_plans_refuse_what_is_no_rgb_set():
  images = np.zeros((4, 16, 16, 3), np.uint8)
  good = pairs.VerificationSet(images, np.array([[0, 1], [2, 3]]), np.array([True, False]))
  (plan,) = pairs.PLANNERS["arrays"].plan(pairs.ArraySource({"g": good}, "mine"))
  assert not plan.encoded and plan.images is images
  gray = pairs.ArraySource({"g": pairs.VerificationSet(images[..., 0], good.pairs,
                                                       good.issame)}, "mine")
  with pytest.raises(UserError, match=r"mine\['g'\]: images of shape \(4, 16, 16\)"):
    pairs.PLANNERS["arrays"].plan(gray)
  with pytest.raises(UserError, match="expected a VerificationSet"):
    pairs.PLANNERS["arrays"].plan(pairs.ArraySource({"g": images}, "mine"))


def test_check_pairs_names_the_problem():
  same = np.array([True, False])
  pairs.check_pairs(np.array([[0, 1], [1, 2]]), same, 3, "g")
  with pytest.raises(UserError, match=r"g: pairs of shape \(2, 3\)"):
    pairs.check_pairs(np.zeros((2, 3), int), same, 3, "g")
  with pytest.raises(UserError, match=r"must lie in \[0, 3\), found 0..3"):
    pairs.check_pairs(np.array([[0, 1], [1, 3]]), same, 3, "g")
  with pytest.raises(UserError, match="2 pairs; the 10-fold verification protocol"):
    pairs.check_pairs(np.array([[0, 1], [1, 2]]), same, 3, "g", min_pairs=10)


def test_decode_resizes_other_sizes_bilinearly_and_says_which():
  small, big = fx.png_bytes(1, size=12), fx.png_bytes(2, size=20)
  plan = pairs.GroupPlan("g", [(small, "small"), (big, "big")], np.array([[0, 1]]),
                         np.array([True]))
  decoded = pairs.decode(plan, 12)
  vset = decoded.vset
  assert decoded.resized == [[20, 20]] and vset.images.shape == (2, 12, 12, 3)
  assert decoded.aligned == decoded.taken_as_aligned == 0  # No landmarks: nothing aligned.
  np.testing.assert_array_equal(vset.images[0], decode_image(small, "small"))
  want = Image.fromarray(decode_image(big, "big")).resize((12, 12), Image.BILINEAR)
  np.testing.assert_array_equal(vset.images[1], np.asarray(want))
  with pytest.raises(UserError, match=r"images of sizes \[\(12, 12\), \(20, 20\)\]"):
    pairs.decode(plan)
  corrupt = pairs.GroupPlan("g", [(b"not an image", "file.jpg")], np.zeros((0, 2), int),
                            np.zeros(0, bool))
  with pytest.raises(UserError, match="file.jpg"):
    pairs.decode(corrupt, 12)
