"""Tests for the insightface-style verification metrics (evaluation/verification.py)."""

import math
import time

import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import verification as V

GRID = np.arange(0, 4, 0.01)


def _reference(dist, issame, thresholds, far_grid, far_targets, num_folds=10):
  """Independent, loop-only version of the protocol (folds, thresholds and pairs)."""
  dist = [float(d) for d in dist]
  issame = [bool(s) for s in issame]
  n = len(dist)
  folds, start = [], 0
  for f in range(num_folds):
    size = n // num_folds + (1 if f < n % num_folds else 0)
    folds.append(list(range(start, start + size)))
    start += size

  def confusion(thr, idx):
    tp = fp = tn = fn = 0
    for i in idx:
      if dist[i] < thr:
        if issame[i]:
          tp += 1
        else:
          fp += 1
      elif issame[i]:
        fn += 1
      else:
        tn += 1
    return tp, fp, tn, fn

  def mean(xs):
    return sum(xs) / len(xs)

  def pop_std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

  accs, best_thr = [], []
  tprs = [[0.0] * len(thresholds) for _ in folds]
  fprs = [[0.0] * len(thresholds) for _ in folds]
  for f, test in enumerate(folds):
    train = [i for g, fold in enumerate(folds) if g != f for i in fold]
    best_acc, best = -1.0, None
    for thr in thresholds:
      tp, fp, tn, fn = confusion(thr, train)
      acc = (tp + tn) / len(train)
      if acc > best_acc:  # strict: keeps the first maximum
        best_acc, best = acc, thr
    tp, fp, tn, fn = confusion(best, test)
    accs.append((tp + tn) / len(test))
    best_thr.append(float(best))
    for t, thr in enumerate(thresholds):
      tp, fp, tn, fn = confusion(thr, test)
      tprs[f][t] = tp / (tp + fn) if tp + fn else 0.0
      fprs[f][t] = fp / (fp + tn) if fp + tn else 0.0
  tpr = [mean([tprs[f][t] for f in range(len(folds))]) for t in range(len(thresholds))]
  fpr = [mean([fprs[f][t] for f in range(len(folds))]) for t in range(len(thresholds))]

  tar = {}
  for target in far_targets:
    vals, fars = [], []
    for f, test in enumerate(folds):
      train = [i for g, fold in enumerate(folds) if g != f for i in fold]
      curve = []
      for thr in far_grid:
        tp, fp, tn, fn = confusion(thr, train)
        curve.append(fp / (fp + tn) if fp + tn else 0.0)
      if max(curve) < target:
        thr = 0.0
      else:
        j = -1
        for i, v in enumerate(curve):
          if v <= target:
            j = i
        if j == len(curve) - 1 or curve[j] == target:
          thr = float(far_grid[j])
        else:
          slope = (far_grid[j + 1] - far_grid[j]) / (curve[j + 1] - curve[j])
          thr = float(far_grid[j] + (target - curve[j]) * slope)
      tp, fp, tn, fn = confusion(thr, test)
      vals.append(tp / (tp + fn) if tp + fn else 0.0)
      fars.append(fp / (fp + tn) if fp + tn else 0.0)
    tar[V.far_key(target)] = (mean(vals), pop_std(vals), mean(fars))
  return {"accuracy": mean(accs), "accuracy_std": pop_std(accs), "best": best_thr,
          "tpr": tpr, "fpr": fpr, "tar": tar}


def _assert_matches(got, ref):
  assert got["accuracy"] == pytest.approx(ref["accuracy"], rel=1e-12, abs=1e-12)
  assert got["accuracy_std"] == pytest.approx(ref["accuracy_std"], rel=1e-9, abs=1e-12)
  assert got["best_thresholds"] == ref["best"]
  np.testing.assert_allclose(got["roc"]["tpr"], ref["tpr"], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got["roc"]["fpr"], ref["fpr"], rtol=1e-12, atol=1e-12)
  assert set(got["tar_at_far"]) == set(ref["tar"])
  for key, (tar, tar_std, far) in ref["tar"].items():
    assert got["tar_at_far"][key]["tar"] == pytest.approx(tar, abs=1e-12)
    assert got["tar_at_far"][key]["tar_std"] == pytest.approx(tar_std, abs=1e-12)
    assert got["tar_at_far"][key]["far"] == pytest.approx(far, abs=1e-12)


def test_matches_loop_reference_with_ties():
  # Distances taken FROM the threshold grid: ties with thresholds and between pairs;
  # 103 pairs gives unequal folds (3 x 11 + 7 x 10).
  rng = np.random.default_rng(0)
  issame = rng.random(103) < 0.5
  idx = np.where(issame, rng.integers(0, 250, 103), rng.integers(100, 400, 103))
  dist = GRID[idx]
  targets = (1e-3, 0.05, 0.2)
  got = V.evaluate_distances(dist, issame, thresholds=GRID, far_thresholds=GRID,
                             far_targets=targets)
  _assert_matches(got, _reference(dist, issame, GRID, GRID, targets))


def test_matches_loop_reference_continuous_and_unreachable_far():
  rng = np.random.default_rng(1)
  issame = rng.random(97) < 0.4
  dist = np.where(issame, rng.uniform(0.2, 2.2, 97), rng.uniform(1.0, 3.9, 97))
  got = V.evaluate_distances(dist, issame, thresholds=GRID, far_thresholds=GRID,
                             far_targets=(0.01, 0.1))
  _assert_matches(got, _reference(dist, issame, GRID, GRID, (0.01, 0.1)))
  # A grid that stops below every impostor: the target FAR is unreachable -> threshold 0.
  low = GRID[:40]
  got = V.evaluate_distances(dist, issame, thresholds=GRID, far_thresholds=low,
                             far_targets=(0.05,))
  ref = _reference(dist, issame, GRID, low, (0.05,))
  _assert_matches(got, ref)
  assert got["tar_at_far"]["5e-2"]["fold_thresholds"] == [0.0] * 10


def test_matches_loop_reference_far_hits_plateau_exactly():
  # Alternating labels: 5 impostors per fold, 45 in the 9 training folds, so the
  # training FAR takes values k/45 and the target 9/45 == 0.2 lands exactly on a plateau.
  issame = np.arange(100) % 2 == 0
  rng = np.random.default_rng(2)
  dist = np.where(issame, GRID[rng.integers(0, 200, 100)], GRID[rng.integers(50, 400, 100)])
  got = V.evaluate_distances(dist, issame, thresholds=GRID, far_thresholds=GRID,
                             far_targets=(0.2,))
  _assert_matches(got, _reference(dist, issame, GRID, GRID, (0.2,)))


def test_evaluate_verification_matches_reference_on_embeddings():
  rng = np.random.default_rng(3)
  pairs, dim = 60, 8
  issame = rng.random(pairs) < 0.5
  emb = rng.normal(size=(2 * pairs, dim))
  emb[1::2][issame] = emb[0::2][issame] + 0.7 * rng.normal(size=(issame.sum(), dim))
  flip = emb + 0.3 * rng.normal(size=emb.shape)

  def loop_distances(rows):
    out = []
    for k in range(pairs):
      a, b = rows[2 * k], rows[2 * k + 1]
      na = math.sqrt(sum(v * v for v in a))
      nb = math.sqrt(sum(v * v for v in b))
      out.append(sum((x / na - y / nb) ** 2 for x, y in zip(a, b)))
    return out

  res = V.evaluate_verification(emb, flip, issame, far_targets=(0.1,))
  fused = loop_distances([list(e + f) for e, f in zip(emb, flip)])  # raw sum, then normalize
  plain = loop_distances([list(e) for e in emb])
  ref = _reference(fused, issame, GRID, GRID, ())
  ref_plain = _reference(plain, issame, GRID, GRID, ())
  assert res["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
  assert res["accuracy_noflip"] == pytest.approx(ref_plain["accuracy"], abs=1e-12)
  np.testing.assert_allclose(res["distances"], fused, atol=1e-12)
  assert res["issame"].dtype == bool and res["flip"] is True
  assert set(res) >= {"accuracy", "accuracy_std", "accuracy_noflip", "accuracy_noflip_std",
                      "best_thresholds", "tar_at_far", "roc", "distances", "issame"}
  assert set(res["tar_at_far"]["1e-1"]) >= {"tar", "tar_std", "far"}
  assert len(res["roc"]["fpr"]) == len(res["roc"]["thresholds"]) == 400
  # Without flips, the plain numbers are the headline ones.
  res_noflip = V.evaluate_verification(emb, None, issame)
  assert res_noflip["accuracy"] == res_noflip["accuracy_noflip"] == res["accuracy_noflip"]
  assert res_noflip["flip"] is False


def test_perfectly_separable():
  # Genuine: e_k vs 2 e_k (distance 0 after normalizing); impostor: e_k vs the
  # orthogonal e_{P+k} (distance 2).
  pairs = 200
  issame = np.arange(pairs) % 3 == 0
  emb = np.zeros((2 * pairs, 2 * pairs))
  for k in range(pairs):
    emb[2 * k, k] = 1.0
    emb[2 * k + 1, k if issame[k] else pairs + k] = 2.0
  res = V.evaluate_verification(emb, None, issame)
  assert res["accuracy"] == 1.0
  assert res["accuracy_std"] == 0.0
  assert set(np.round(res["distances"], 12)) == {0.0, 2.0}


def test_random_is_chance():
  rng = np.random.default_rng(4)
  pairs = 6000
  res = V.evaluate_verification(rng.normal(size=(2 * pairs, 32)), None,
                                rng.random(pairs) < 0.5)
  assert 0.46 < res["accuracy"] < 0.54


def test_speed_6000_pairs():
  rng = np.random.default_rng(5)
  pairs = 6000
  issame = rng.random(pairs) < 0.5
  dist = rng.uniform(0, 4, pairs)
  start = time.perf_counter()
  V.evaluate_distances(dist, issame)  # 400 thresholds + TAR@FAR on 4,000
  core = time.perf_counter() - start
  emb = rng.normal(size=(2 * pairs, 128))
  start = time.perf_counter()
  V.evaluate_verification(emb, emb + 0.1, issame)
  full = time.perf_counter() - start
  # Measured ~0.01 s and ~0.2 s on the 2-core CPU; the bounds leave room for a busy machine.
  assert core < 0.5, core
  assert full < 2.0, full


def test_fold_bounds_like_kfold():
  # KFold(10) on 103 items: 3 folds of 11, then 7 of 10, contiguous and in order.
  assert V.fold_bounds(103, 10) == [(0, 11), (11, 22), (22, 33), (33, 43), (43, 53),
                                    (53, 63), (63, 73), (73, 83), (83, 93), (93, 103)]
  assert V.fold_bounds(20, 10)[-1] == (18, 20)


def test_threshold_for_far_rule():
  # FAR curve with plateaus; thresholds 0..9. Expected values are those of
  # scipy interp1d(kind="slinear") as scipy <= 1.8 evaluated it (right-continuous).
  far = np.array([0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.5, 1, 1])
  grid = np.arange(10.0)
  assert V.threshold_for_far(far, grid, 0.05) == pytest.approx(1.5)  # between (0,1), (0.1,2)
  assert V.threshold_for_far(far, grid, 0.1) == 4.0  # last index of the 0.1 plateau
  assert V.threshold_for_far(far, grid, 0.15) == pytest.approx(4.5)
  assert V.threshold_for_far(far, grid, 0.3) == pytest.approx(6 + 0.1 / 0.3)
  assert V.threshold_for_far(far, grid, 1.0) == 9.0
  assert V.threshold_for_far(far * 0.5, grid, 0.6) == 0.0  # never reached


def test_normalize_and_flip_fusion():
  x = np.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(V.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
  # Fusion sums the RAW outputs: [3,0] + [0,1] -> [3,1]/sqrt(10), not the
  # sum of the normalized vectors ([1,1]/sqrt(2)).
  fused = V.fuse_flip([[3.0, 0.0]], [[0.0, 1.0]])
  np.testing.assert_allclose(fused, [[3 / math.sqrt(10), 1 / math.sqrt(10)]])


def test_far_key():
  assert V.far_key(1e-3) == "1e-3"
  assert V.far_key(0.01) == "1e-2"
  assert V.far_key(0.05) == "5e-2"
  assert V.far_key(2.5e-4) == "2.5e-4"


@pytest.mark.parametrize("emb_rows, flip_rows, labels, folds, needle", [
    (7, None, 3, 10, "even number of rows"),
    (40, None, 19, 10, "expected 20 labels"),
    (16, None, 8, 10, "fewer than num_folds"),
    (40, 38, 20, 10, "flip_embeddings"),
    (40, None, 20, 1, "num_folds"),
])
def test_validation(emb_rows, flip_rows, labels, folds, needle):
  emb = np.ones((emb_rows, 4))
  flip = None if flip_rows is None else np.ones((flip_rows, 4))
  with pytest.raises(UserError, match=needle):
    V.evaluate_verification(emb, flip, np.zeros(labels, bool), num_folds=folds)


def test_validation_nan_and_labels():
  emb = np.ones((40, 4))
  emb[3, 1] = np.nan
  with pytest.raises(UserError, match="embeddings: expected finite"):
    V.evaluate_verification(emb, None, np.zeros(20, bool))
  with pytest.raises(UserError, match="issame"):
    V.evaluate_verification(np.ones((40, 4)), None, np.full(20, 2))
  with pytest.raises(UserError, match="far_targets"):
    V.evaluate_verification(np.ones((40, 4)), None, np.zeros(20, bool), far_targets=(0.0,))
