"""Tests for the target-space diagnostics (evaluation/target_space.py) against brute force,
and the collapse warning and table of their results (evaluation/space_report.py)."""

import itertools

import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import space_report as R
from mstkd_jax.evaluation import target_space as T


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _space(seed, groups, ids_per_group, dim, spread, noise, counts=None):
  """Images around identity directions; identity direction = group direction + spread * random."""
  rng = np.random.default_rng(seed)
  rows, identity, group = [], [], []
  k = 0
  for g in range(groups):
    base = rng.normal(size=dim)
    for _ in range(ids_per_group):
      direction = _unit(base + spread * rng.normal(size=dim))
      n = counts[k % len(counts)] if counts is not None else 6
      for _ in range(n):
        rows.append(direction + noise * rng.normal(size=dim) / np.sqrt(dim))
        identity.append(k)
        group.append(g)
      k += 1
  return np.array(rows), np.array(identity), np.array(group)


def _brute_force(emb, identity, group):
  """Every statistic from full cosine matrices and explicit loops."""
  x = _unit(emb.reshape(len(emb), -1).astype(np.float64))
  cos = x @ x.T
  ids = sorted(set(identity.tolist()))
  gid = {k: int(group[identity == k][0]) for k in ids}
  cent = {k: _unit(x[identity == k].mean(axis=0)) for k in ids}
  within = {}
  for k in ids:
    rows = np.flatnonzero(identity == k)
    if len(rows) >= 2:
      within[k] = np.mean([cos[i, j] for i, j in itertools.combinations(rows, 2)])
  same, cross = [], []
  same_g = {}
  images_g = {}  # cosines of image pairs of different identities, per group
  for i, j in itertools.combinations(range(len(x)), 2):
    if identity[i] != identity[j] and group[i] == group[j]:
      images_g.setdefault(int(group[i]), []).append(cos[i, j])
  for k, l in itertools.combinations(ids, 2):
    c = float(cent[k] @ cent[l])
    if gid[k] == gid[l]:
      same.append(c)
      same_g.setdefault(gid[k], []).append(c)
    else:
      cross.append(c)
  correct, scored = 0, 0
  for i in range(len(x)):
    k = int(identity[i])
    if np.count_nonzero(identity == k) < 2:
      continue
    others = [j for j in np.flatnonzero(identity == k) if j != i]
    loo = _unit(x[others].sum(axis=0))
    own = float(x[i] @ loo)
    best_other = max(float(x[i] @ cent[l]) for l in ids if l != k)
    correct += own > best_other
    scored += 1
  per_group = {}
  for g in sorted(set(gid.values())):
    w = [within[k] for k in ids if gid[k] == g and k in within]
    bi = np.mean(images_g[g]) if g in images_g else None
    per_group[g] = {"within_identity": np.mean(w) if w else None,
                    "between_identities_same_group": (np.mean(same_g[g]) if g in same_g
                                                      else None),
                    "between_images_same_group": bi,
                    "separation": None if not w or bi is None else np.mean(w) - bi}
  return {"within_identity": np.mean(list(within.values())),
          "between_identities_same_group": np.mean(same),
          "between_images_same_group": np.mean(np.concatenate(list(images_g.values()))),
          "between_groups": np.mean(cross) if cross else None,
          "nearest_centroid_accuracy": correct / scored, "num_sampled": scored,
          "num_identities": len(ids), "per_group": per_group}


def _assert_same_stats(a, b, tol):
  for key in ("within_identity", "between_identities_same_group",
              "between_images_same_group", "between_groups", "separation",
              "nearest_centroid_accuracy"):
    assert a[key] == pytest.approx(b[key], abs=tol), key
  assert a["per_group"].keys() == b["per_group"].keys()
  for g in a["per_group"]:
    for key, value in a["per_group"][g].items():
      assert value == pytest.approx(b["per_group"][g][key], abs=tol), (g, key)


def test_every_statistic_equals_brute_force():
  # 3 groups x 4 identities of 1 to 5 images (single-image identities included), D = 8.
  emb, identity, group = _space(1, 3, 4, 8, spread=0.8, noise=1.5, counts=[5, 1, 3, 2, 4])
  s = T.space_statistics(emb, identity, group)
  ref = _brute_force(emb, identity, group)
  for key in ("within_identity", "between_identities_same_group",
              "between_images_same_group", "between_groups"):
    assert s[key] == pytest.approx(ref[key], abs=1e-12), key
  assert s["separation"] == pytest.approx(ref["within_identity"]
                                          - ref["between_images_same_group"], abs=1e-12)
  assert 0 < ref["nearest_centroid_accuracy"] < 1  # the example is not trivial
  assert s["nearest_centroid_accuracy"] == ref["nearest_centroid_accuracy"]
  assert (s["num_images"], s["num_identities"], s["num_sampled"]) == (
      len(emb), ref["num_identities"], ref["num_sampled"])
  for g, ref_g in ref["per_group"].items():
    got = s["per_group"][g]
    assert got["within_identity"] == pytest.approx(ref_g["within_identity"], abs=1e-12)
    assert got["between_identities_same_group"] == pytest.approx(
        ref_g["between_identities_same_group"], abs=1e-12)
    assert got["between_images_same_group"] == pytest.approx(
        ref_g["between_images_same_group"], abs=1e-12)
    assert got["separation"] == pytest.approx(ref_g["separation"], abs=1e-12)


def test_between_groups_is_none_with_one_group():
  emb, identity, group = _space(2, 1, 4, 8, spread=1.0, noise=0.5)
  s = T.space_statistics(emb, identity, group)
  assert s["between_groups"] is None
  assert s["between_identities_same_group"] == pytest.approx(
      _brute_force(emb, identity, group)["between_identities_same_group"], abs=1e-12)


def test_nearest_centroid_is_leave_one_out():
  # Pure noise, 2 images an identity, D = 256: a centroid that includes the query has cosine
  # ~0.7 with it (always nearest); without it ~0 like every other centroid, so near chance.
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(200, 256))
  identity = np.repeat(np.arange(100), 2)
  s = T.space_statistics(emb, identity, np.zeros(200, dtype=int))
  assert s["nearest_centroid_accuracy"] < 0.2
  assert s["nearest_centroid_accuracy"] == _brute_force(
      emb, identity, np.zeros(200, dtype=int))["nearest_centroid_accuracy"]


def test_sample_is_fixed_and_bounded():
  emb, identity, group = _space(4, 2, 5, 8, spread=1.0, noise=1.0)
  a = T.space_statistics(emb, identity, group, sample=17, seed=5)
  b = T.space_statistics(emb, identity, group, sample=17, seed=5, chunk=9)
  assert a["num_sampled"] == 17
  assert a["nearest_centroid_accuracy"] == b["nearest_centroid_accuracy"]
  assert T.space_statistics(emb, identity, group, sample=0)["nearest_centroid_accuracy"] is None


def test_chunked_memmap_equals_unchunked(tmp_path):
  emb, identity, group = _space(5, 3, 5, 16, spread=1.0, noise=1.0, counts=[4, 7, 1, 3])
  # Rows out of identity order, so chunks hold identities in any order.
  perm = np.random.default_rng(0).permutation(len(emb))
  emb, identity, group = emb[perm].astype(np.float32), identity[perm], group[perm]
  path = tmp_path / "targets.npy"
  writer = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=emb.shape)
  writer[:] = emb
  writer.flush()
  del writer
  mapped = np.load(path, mmap_mode="r")
  chunked = T.space_statistics(mapped, identity, group, chunk=7)
  whole = T.space_statistics(emb, identity, group, chunk=len(emb))
  _assert_same_stats(chunked, whole, 1e-6)
  assert chunked["num_sampled"] == whole["num_sampled"]


def test_teacher_axis_input_equals_its_reshape():
  emb, identity, group = _space(6, 2, 4, 12, spread=1.0, noise=1.0)
  stacked = emb.reshape(len(emb), 3, 4)
  _assert_same_stats(T.space_statistics(stacked, identity, group),
                     T.space_statistics(emb, identity, group), 1e-12)


def test_collapse_warning_fires_on_collapsed_targets():
  # Every identity near one direction, images with tiny noise.
  emb, identity, group = _space(7, 2, 6, 64, spread=0.05, noise=0.05)
  s = T.space_statistics(emb, identity, group)
  assert s["separation"] < R.COLLAPSE_MARGIN
  line = R.collapse_warning("adaptor/DuL", s)
  assert line is not None and "\n" not in line
  assert line.startswith("adaptor/DuL: identities barely separated in the target space")
  assert f"separation {s['separation']:.2f} < 0.10" in line
  assert "nearest-centroid accuracy" in line


def test_collapse_warning_silent_on_well_spread_targets():
  # Random (near-orthogonal in 64-D) identity directions, moderate noise.
  emb, identity, group = _space(8, 2, 6, 64, spread=3.0, noise=0.8)
  s = T.space_statistics(emb, identity, group)
  assert s["separation"] > 0.2
  assert R.collapse_warning("adaptor/DuL", s) is None


def test_collapse_warning_names_a_single_collapsed_group():
  spread_emb, spread_id, _ = _space(9, 1, 6, 64, spread=3.0, noise=0.8)
  tight_emb, tight_id, _ = _space(10, 1, 6, 64, spread=0.05, noise=0.05)
  emb = np.concatenate([spread_emb, tight_emb])
  identity = np.concatenate([spread_id, tight_id + 6])
  group = np.repeat([0, 1], [len(spread_emb), len(tight_emb)])
  s = T.space_statistics(emb, identity, group)
  assert s["separation"] >= R.COLLAPSE_MARGIN
  line = R.collapse_warning("x", s)
  assert line is not None and "group 1 (" in line and "group 0" not in line


def test_mismatched_lengths_raise():
  emb, identity, group = _space(11, 2, 3, 8, spread=1.0, noise=1.0)
  with pytest.raises(UserError, match="identity"):
    T.space_statistics(emb, identity[:-1], group)
  with pytest.raises(UserError, match="group"):
    T.space_statistics(emb, identity, group[1:])


def test_zero_row_raises_naming_the_row():
  emb, identity, group = _space(12, 2, 3, 8, spread=1.0, noise=1.0)
  emb[13] = 0.0
  with pytest.raises(UserError, match="row 13 has norm 0"):
    T.space_statistics(emb, identity, group, chunk=5)


def test_identity_in_two_groups_raises():
  emb, identity, group = _space(13, 2, 3, 8, spread=1.0, noise=1.0)
  group = group.copy()
  group[2] = 1  # a row of identity 0 (group 0)
  with pytest.raises(UserError, match="identity 0 is in group 0 .* and in group 1"):
    T.space_statistics(emb, identity, group)


def test_mean_cosine_equals_numpy():
  rng = np.random.default_rng(14)
  a, b = rng.normal(size=(50, 9)), rng.normal(size=(50, 9))
  expected = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  np.testing.assert_allclose(T.per_row_cosine(a, b), expected, atol=1e-12)
  assert T.mean_cosine(a, b) == pytest.approx(expected.mean(), abs=1e-12)
  assert T.mean_cosine(a.astype(np.float16), b.astype(np.float32)) == pytest.approx(
      expected.mean(), abs=1e-2)


def test_mean_cosine_shape_mismatch_raises():
  with pytest.raises(UserError, match="one shape"):
    T.mean_cosine(np.ones((3, 4)), np.ones((3, 5)))


def test_format_table():
  stats = {"within_identity": 0.81, "between_identities_same_group": 0.54,
           "between_images_same_group": 0.45, "between_groups": None, "separation": 0.36,
           "nearest_centroid_accuracy": 0.9}
  header, rows = R.format_table({"adaptor/DuL": stats})
  assert header == R.TABLE_HEADER and len(header) == 7
  assert rows == [["adaptor/DuL", "0.810", "0.540", "0.450", "-", "0.360", "0.900"]]
