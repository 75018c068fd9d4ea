"""The held-out validation split: new identities of their own, drawn without touching the
training and test arrays, cached with them, and offered by data/sources.py only where it
is not the test set."""

import importlib
import os
import shutil

import numpy as np
import pytest

import data_fixtures as fx
from configs import common
from mstkd_jax.data import sources, synthetic
from mstkd_jax.errors import UserError

SMALL = dict(num_groups=3, identities_per_group=5, images_per_identity=3,
             eval_identities_per_group=4, eval_images_per_identity=3, pairs_per_group=12,
             image_size=20, seed=7)
VALIDATION = dict(validation_identities_per_group=3, validation_pairs_per_group=8)
SMALL_GROUPS = ("group_a", "group_b", "group_c")


@pytest.fixture(scope="module")
def plain():
  return synthetic.generate(synthetic.SyntheticSpec(**SMALL))


@pytest.fixture(scope="module")
def with_validation():
  return synthetic.generate(synthetic.SyntheticSpec(**SMALL, **VALIDATION))


def _assert_same_train_and_test(a, b):
  for field in ("train_images", "train_identity", "train_group"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert getattr(a, field).dtype == getattr(b, field).dtype
  for field in ("eval_images", "eval_identity", "eval_pairs", "eval_issame"):
    assert getattr(a, field).keys() == getattr(b, field).keys()
    for name in a.spec.group_names:
      np.testing.assert_array_equal(getattr(a, field)[name], getattr(b, field)[name])


def test_validation_leaves_train_and_test_arrays_unchanged(plain, with_validation):
  # Own random streams: asking for validation identities shifts no other draw. (That the
  # arrays without validation are the original generator's is tests/test_synthetic.py's
  # golden-value test.)
  _assert_same_train_and_test(with_validation, plain)
  assert not plain.spec.has_validation and with_validation.spec.has_validation
  for field in ("validation_images", "validation_identity", "validation_pairs",
                "validation_issame"):
    assert getattr(plain, field) == {}
    assert list(getattr(with_validation, field)) == list(SMALL_GROUPS)
  # A larger validation split changes nothing else either.
  bigger = synthetic.generate(synthetic.SyntheticSpec(
      **SMALL, validation_identities_per_group=5, validation_pairs_per_group=20))
  _assert_same_train_and_test(bigger, plain)


def test_validation_identities_are_new(with_validation):
  s = with_validation.spec
  G, I, E, V = (s.num_groups, s.identities_per_group, s.eval_identities_per_group,
                s.validation_identities_per_group)
  train_ids = set(with_validation.train_identity.tolist())
  test_ids = set(np.concatenate(list(with_validation.eval_identity.values())).tolist())
  seen = set()
  for g, name in enumerate(s.group_names):
    ids = with_validation.validation_identity[name]
    images = with_validation.validation_images[name]
    assert ids.dtype == np.int32 and ids.shape == (V * s.eval_images_per_identity,)
    assert images.dtype == np.uint8 and images.shape == (len(ids), 20, 20, 3)
    # Labels continue after all evaluation identities, group by group.
    first = G * I + G * E + g * V
    np.testing.assert_array_equal(ids, np.repeat(np.arange(first, first + V),
                                                 s.eval_images_per_identity))
    assert not set(ids.tolist()) & (train_ids | test_ids | seen)
    seen |= set(ids.tolist())
    # Drawn images, not copies of the test or training images.
    drawn = {im.tobytes() for im in images}
    assert len(drawn) == len(images)
    assert not drawn & {im.tobytes() for im in with_validation.eval_images[name]}
    assert not drawn & {im.tobytes() for im in with_validation.train_images}
    assert images.std() > 20


def test_validation_pairs_half_same_and_balanced(with_validation):
  for name in with_validation.spec.group_names:
    pairs = with_validation.validation_pairs[name]
    issame = with_validation.validation_issame[name]
    ids = with_validation.validation_identity[name]
    assert pairs.dtype == np.int32 and pairs.shape == (8, 2)
    assert issame.dtype == np.bool_ and issame.sum() == 4
    assert pairs.min() >= 0 and pairs.max() < len(ids) and np.all(pairs[:, 0] < pairs[:, 1])
    np.testing.assert_array_equal(ids[pairs[:, 0]] == ids[pairs[:, 1]], issame)
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    # Same/different alternate: every even-sized contiguous fold is balanced.
    np.testing.assert_array_equal(issame, np.arange(8) % 2 == 0)


def test_deterministic_and_seeded(with_validation):
  again = synthetic.generate(synthetic.SyntheticSpec(**SMALL, **VALIDATION))
  other = synthetic.generate(synthetic.SyntheticSpec(**{**SMALL, "seed": 8}, **VALIDATION))
  for name in with_validation.spec.group_names:
    np.testing.assert_array_equal(again.validation_images[name],
                                  with_validation.validation_images[name])
    np.testing.assert_array_equal(again.validation_pairs[name],
                                  with_validation.validation_pairs[name])
    assert np.mean(other.validation_images[name]
                   != with_validation.validation_images[name]) > 0.5


def _assert_faces_equal(a, b):
  for field in ("train_images", "train_identity", "train_group"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  for split in ("eval", "validation"):
    for part in ("images", "identity", "pairs", "issame"):
      x, y = getattr(a, f"{split}_{part}"), getattr(b, f"{split}_{part}")
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
        assert x[k].dtype == y[k].dtype


def test_cache_round_trip(tmp_path, monkeypatch, plain, with_validation):
  specs = [plain.spec, with_validation.spec]
  first = [synthetic.load_or_generate(spec, tmp_path) for spec in specs]
  assert synthetic.cache_path(specs[0], tmp_path) != synthetic.cache_path(specs[1], tmp_path)
  with np.load(synthetic.cache_path(specs[0], tmp_path)) as z:
    assert not any(k.startswith("validation_") for k in z.files)
  with np.load(synthetic.cache_path(specs[1], tmp_path)) as z:
    assert sum(k.startswith("validation_") for k in z.files) == 4 * 3
  monkeypatch.setattr(synthetic, "generate", lambda spec: pytest.fail("regenerated"))
  for spec, faces, generated in zip(specs, first, (plain, with_validation)):
    loaded = synthetic.load_or_generate(spec, tmp_path)
    _assert_faces_equal(loaded, faces)
    _assert_faces_equal(loaded, generated)


def test_cache_missing_validation_arrays_raises_user_error(tmp_path, with_validation):
  spec = with_validation.spec
  path = synthetic.cache_path(spec, tmp_path)
  arrays = synthetic._to_arrays(with_validation)  # pylint: disable=protected-access
  del arrays["validation_pairs/group_b"]
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  with pytest.raises(UserError, match="delete"):
    synthetic.load_or_generate(spec, tmp_path)


@pytest.mark.parametrize("ids,pairs,field", [
    (3, 0, "validation_identities_per_group=3 and SyntheticSpec.validation_pairs_per_group"),
    (0, 4, "validation_identities_per_group=0 and SyntheticSpec.validation_pairs_per_group"),
    (1, 2, "validation_identities_per_group"),
    (-1, 0, "validation_identities_per_group"),
    (2.0, 4, "validation_identities_per_group"),
    (True, 4, "validation_identities_per_group"),
    (3, 7, "validation_pairs_per_group"),
    (3, -2, "validation_pairs_per_group"),
    (2, 14, "validation_pairs_per_group"),   # 2 x 3 images hold only 6 same pairs.
    (3, "8", "validation_pairs_per_group"),
])
def test_bad_validation_fields_raise_user_error(ids, pairs, field):
  with pytest.raises(UserError, match=f"SyntheticSpec.{field}"):
    synthetic.SyntheticSpec(**SMALL, validation_identities_per_group=ids,
                            validation_pairs_per_group=pairs)


def test_smallest_feasible_validation():
  # 2 x 3 images: exactly 6 same pairs, so 12 pairs are feasible.
  spec = synthetic.SyntheticSpec(**SMALL, validation_identities_per_group=2,
                                 validation_pairs_per_group=12)
  assert spec.has_validation


@pytest.mark.parametrize("scale,ids,pairs", [("smoke", 0, 0), ("recipe", 24, 300),
                                             ("default", 24, 300)])
def test_config_presets(scale, ids, pairs):
  spec = synthetic.SyntheticSpec(**common.synthetic_data(scale).to_dict())
  assert (spec.validation_identities_per_group, spec.validation_pairs_per_group) == (ids, pairs)
  assert spec.eval_images_per_identity == 8
  assert common.base().data.tfds.validation == ""


@pytest.mark.parametrize("module,preset", [
    ("teacher", "default"), ("teacher", "smoke"), ("teacher", "bupt_iresnet34"),
    ("distill", "default"), ("distill", "smoke"), ("distill", "full"),
    ("distill", "bupt_iresnet34")])
def test_presets_make_valid_specs(module, preset):
  # Every preset's synthetic fields, validation split included, make a SyntheticSpec (a
  # preset that shrinks eval_images_per_identity must shrink the validation pairs too).
  config = importlib.import_module(f"configs.{module}").get_config(preset)
  synthetic.SyntheticSpec(**config.data.synthetic.to_dict())


# ---------------------------------------------------------------------------------------
# data/sources.py


def _synthetic_config(**fields):
  config = common.base()
  config.data.synthetic.update({**SMALL, "validation_identities_per_group": 0,
                                "validation_pairs_per_group": 0, **fields})
  return config.data


@pytest.mark.parametrize("fields", [{}, VALIDATION])
def test_sources_synthetic(tmp_path, plain, with_validation, fields):
  data = _synthetic_config(**fields)
  faces = with_validation if fields else plain
  assert sources.has_validation(data) == bool(fields)
  os.makedirs(tmp_path / "data")
  sets = sources.validation_sets(data, str(tmp_path))
  if not fields:
    assert sets == {}
    assert os.listdir(tmp_path / "data") == []  # Nothing generated for nothing.
    return
  assert list(sets) == list(SMALL_GROUPS)
  for name, vset in sets.items():
    np.testing.assert_array_equal(vset.images, faces.validation_images[name])
    np.testing.assert_array_equal(vset.pairs, faces.validation_pairs[name])
    np.testing.assert_array_equal(vset.issame, faces.validation_issame[name])
  # The test pairs are the other set.
  tests = sources.verification_sets(data, str(tmp_path))
  for name in SMALL_GROUPS:
    np.testing.assert_array_equal(tests[name].images, faces.eval_images[name])
    assert not np.array_equal(tests[name].images[:len(sets[name].images)],
                              sets[name].images)


def test_sources_synthetic_bad_fields_raise_user_error(tmp_path):
  data = _synthetic_config(validation_identities_per_group=3)
  with pytest.raises(UserError, match="validation_pairs_per_group"):
    sources.has_validation(data)
  with pytest.raises(UserError, match="validation_pairs_per_group"):
    sources.validation_sets(data, str(tmp_path))


def _tfds_config(data_dir, validation, verification="rfw"):
  config = common.base()
  config.data.source = "tfds"
  config.data.data_dir = str(data_dir)
  config.data.tfds.update(train="faces", verification=verification, validation=validation,
                          image_size=12)
  return config.data


def test_sources_tfds_without_validation_loads_nothing(tmp_path):
  data = _tfds_config(tmp_path / "nothing_prepared", "")
  assert not sources.has_validation(data)
  assert sources.validation_sets(data, str(tmp_path)) == {}


def test_sources_tfds_refuses_the_test_set_before_loading(tmp_path):
  data = _tfds_config(tmp_path / "nothing_prepared", "rfw")
  for call in (lambda: sources.has_validation(data),
               lambda: sources.validation_sets(data, str(tmp_path))):
    with pytest.raises(UserError, match="data.tfds.validation='rfw' names the test set"):
      call()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """RFW fixtures prepared as 'rfw' (the test set), 'rfw_again' (the same source under
  another name) and 'rfw_val' (a copy elsewhere: another source)."""
  pytest.importorskip("tensorflow_datasets")
  from mstkd_jax.formats import prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("validation_tfds")
  pairs = fx.make_rfw(str(root / "RFW"))
  shutil.copytree(root / "RFW", root / "RFW_val")
  data_dir = root / "prepared"
  quiet = lambda _: None
  prepare.prepare("rfw", str(root / "RFW"), str(data_dir), name="rfw", log=quiet)
  prepare.prepare("rfw", str(root / "RFW"), str(data_dir), name="rfw_again", log=quiet)
  prepare.prepare("rfw", str(root / "RFW_val"), str(data_dir), name="rfw_val", log=quiet)
  return data_dir, pairs


def test_sources_tfds_validation_set(prepared, tmp_path):
  data_dir, pairs = prepared
  data = _tfds_config(data_dir, "rfw_val")
  assert sources.has_validation(data)
  sets = sources.validation_sets(data, str(tmp_path))
  tests = sources.verification_sets(data, str(tmp_path))
  assert list(sets) == list(tests) == ["African", "Asian"]
  for group, vset in sets.items():
    assert vset.images.dtype == np.uint8 and vset.images.shape[1:] == (12, 12, 3)
    np.testing.assert_array_equal(vset.issame, [s for _, _, s in pairs[group]])
    np.testing.assert_array_equal(vset.pairs, tests[group].pairs)


def test_sources_tfds_refuses_the_test_set_under_another_name(prepared, tmp_path):
  data_dir, _ = prepared
  data = _tfds_config(data_dir, "rfw_again")
  assert sources.has_validation(data)  # Names differ: only the metadata tells.
  with pytest.raises(UserError, match="rfw_again.*prepared from .*RFW, as the test set"):
    sources.validation_sets(data, str(tmp_path))


def test_sources_tfds_unprepared_validation_is_named(prepared, tmp_path):
  data_dir, _ = prepared
  with pytest.raises(UserError, match="no prepared data set 'nope'"):
    sources.validation_sets(_tfds_config(data_dir, "nope"), str(tmp_path))
