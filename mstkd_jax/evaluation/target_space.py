"""Diagnostics of an embedding space: are identities separated, or have the targets collapsed?

Pure numpy. An adaptor's training targets (or any embedding cache: a teacher set's
concatenated embeddings, a student's embeddings) are summarized by cosines between unit
vectors, in [-1, 1]:

  within_identity                mean cosine of two different images of one identity;
  between_identities_same_group  mean cosine of the centroids of two different identities of
                                 one demographic group;
  between_images_same_group      mean cosine of two images of different identities of one
                                 group (the impostor pairs verification sees);
  between_groups                 the centroid cosine for two identities of different groups;
  separation                     within_identity - between_images_same_group: how much
                                 closer genuine pairs are than impostor pairs of one group;
  nearest_centroid_accuracy      fraction of (sampled) images nearest to their own identity's
                                 leave-one-out centroid.

A recipe run once produced collapsed targets: two identities of one group had centroid cosine
0.96 while two images of one identity reached only 0.97, and the students distilled from
them could not learn identity; a healthy adaptor measured 0.81 within, 0.54 between
identities of a group, 0.18 across groups. `space_report.collapse_warning` flags the
first kind.

Separation compares image pairs with image pairs. Centroids average away per-image noise, so
the centroids of two identities can be as close as two images of one identity while the
identities are still told apart: the plain concatenation of four specialized teachers
(each blind to three groups) measured 0.56 within an identity and 0.56 between centroids,
yet 0.73 nearest-centroid accuracy. The mean image-pair cosine between identities k and l
is |c_k| |c_l| cos(c_k, c_l) for the unnormalized centroids c, with |c_k|^2 = 1/n_k +
(n_k - 1)/n_k x within_k, so the collapsed targets above have an image-level separation of
about 0.97 - 0.97 x 0.96 = 0.04, the healthy ones 0.81 - 0.83 x 0.54 = 0.36.

Caches can be far larger than memory (1.3M x 2048 float32 is ~10 GB): `space_statistics`
reads them in row chunks and keeps only per-identity sums (float64 [I, D]) and the sampled
rows ([sample, D]).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mstkd_jax.errors import UserError

# At most this many float64 scores (sampled rows x identities, 512 MiB) exist at once.
_MAX_SCORES = 1 << 26


def fixed_sample(n: int, size: int, seed: int = 0) -> np.ndarray:
  """Sorted int64 positions of at most `size` of `n` items, drawn without replacement with
  numpy's generator seeded `seed` (all `n` when n <= size): the same for every call."""
  if n <= size:
    return np.arange(n, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _labels(values: Any, name: str, n: int) -> np.ndarray:
  """[n] int64 copy of an integer label array; UserError on shape, dtype or a negative label."""
  arr = np.asarray(values)
  if arr.shape != (n,):
    raise UserError(f"{name}: expected one label per embedding row, shape ({n},), "
                    f"got shape {arr.shape}")
  if arr.dtype.kind not in "iu":
    raise UserError(f"{name}: expected integer labels, got dtype {arr.dtype}")
  arr = arr.astype(np.int64)
  if n and arr.min() < 0:
    row = int(np.argmax(arr < 0))
    raise UserError(f"{name}: expected labels >= 0, got {int(arr[row])} at row {row}")
  return arr


def _work_dtype(dtype: np.dtype, name: str) -> np.dtype:
  """float64 for float64 input, float32 for every other float type (float16, bfloat16, ...)."""
  if dtype.kind in "biuOcSUM":
    raise UserError(f"{name}: expected floating-point embeddings, got dtype {dtype}")
  return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _normalized_rows(block: Any, start: int, dtype: np.dtype, name: str) -> np.ndarray:
  """Rows of one chunk as a fresh [n, F] array of `dtype`, each scaled to unit L2 norm.

  block: [n, D] or [n, G, D] (flattened to [n, G*D]); start: the chunk's first row index in the
  whole array (for messages). Raises UserError naming the first row whose norm is 0 or not finite.
  """
  x = np.array(block, dtype=dtype, copy=True)
  x = x.reshape(x.shape[0], -1)
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))
  bad = ~(np.isfinite(norms) & (norms > 0))
  if bad.any():
    row = int(np.argmax(bad))
    what = "norm 0" if norms[row] == 0 else "not finite"
    raise UserError(f"{name}: row {start + row} has {what}; it cannot be L2-normalized")
  x /= norms[:, None]
  return x


def _mean_or_none(values: np.ndarray) -> float | None:
  return float(values.mean()) if values.size else None


def _difference(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def space_statistics(embeddings: Any, identity: Any, group: Any, *, chunk: int = 65536,
                     sample: int = 20000, seed: int = 0) -> dict:
  """Identity separation statistics of an embedding space; the cache is read chunk by chunk.

  Args:
    embeddings: float array [N, D], or [N, G, D] (several teachers' embeddings of each image,
      e.g. a teacher set's plain concatenation; each row is flattened to G*D). Any array that
      slices by rows: a read-only np.memmap larger than memory is read `chunk` rows at a time,
      never whole. Every row is L2-normalized here. Computed in float64 for float64 input,
      float32 otherwise; sums accumulate in float64.
    identity: int [N], the identity label of each row, 0..I-1 (labels that never occur are
      ignored).
    group: int [N], the demographic group of each row; every identity must lie in one group.
    chunk: rows read at once (>= 1).
    sample: at most this many rows are scored for nearest_centroid_accuracy (>= 0).
    seed: seed of the sample; the same arguments give the same sample (sorted row indices).

  Returns:
    A dict of cosines (floats in [-1, 1]; None where no pair exists) and counts:
      within_identity: per identity with >= 2 images, the mean cosine over its pairs of
        different images, exactly (||s_k||^2 - n_k) / (n_k (n_k - 1)) for the sum s_k of its
        n_k unit rows; then the mean over those identities (each counts once).
      between_identities_same_group: mean cosine of the unit centroids c_k = s_k / ||s_k|| of
        two different identities of one group, over all such pairs of all groups, exactly:
        with T_g the sum of group g's centroids, its pairs sum to (||T_g||^2 - m_g) / 2.
      between_images_same_group: mean cosine of two images of different identities of one
        group, over all such pairs of all groups, exactly from the per-group sums of the s_k.
      between_groups: the centroid cosine over pairs of identities of different groups; None
        with one group.
      separation: within_identity - between_images_same_group.
      nearest_centroid_accuracy: over a fixed random sample of at most `sample` rows of
        identities with >= 2 images, the fraction whose cosine-nearest unit centroid is their
        own identity's (ties count as wrong). The own centroid is LEAVE-ONE-OUT: the sum of
        the identity's other images. A centroid that includes the query is pulled towards it
        (with 12 images an identity, 1/12 of it is the query itself), which inflates the
        score, most for the small, noisy identities a collapse hurts; rows of single-image
        identities have no leave-one-out centroid and are not sampled. Every identity's full
        centroid competes. None when nothing is sampled.
      num_images: N. num_identities: identities that occur. num_sampled: rows scored.
      per_group: {group label (int): {"within_identity", "between_identities_same_group",
        "separation"}} over that group's identities alone.

  Raises:
    UserError: embeddings not [N, D] / [N, G, D] of a float type, or empty; identity / group
      not int [N] or negative; an identity in two groups; a row of norm 0 or not finite; an
      identity whose images sum to the zero vector (no centroid); chunk < 1 or sample < 0.
  """
  if not hasattr(embeddings, "shape") or not hasattr(embeddings, "dtype"):
    embeddings = np.asarray(embeddings)
  shape = tuple(embeddings.shape)
  if len(shape) not in (2, 3) or shape[0] < 1 or math.prod(shape[1:]) < 1:
    raise UserError(f"embeddings: expected a non-empty array [N, D] or [N, G, D], "
                    f"got shape {shape}")
  dtype = _work_dtype(np.dtype(embeddings.dtype), "embeddings")
  if int(chunk) < 1:
    raise UserError(f"chunk: expected at least 1 row, got {chunk}")
  if int(sample) < 0:
    raise UserError(f"sample: expected a number of rows >= 0, got {sample}")
  chunk, sample = int(chunk), int(sample)
  n, features = shape[0], math.prod(shape[1:])
  labels = _labels(identity, "identity", n)
  groups = _labels(group, "group", n)

  # Compact identity indices 0..I-1 over the labels that occur, and each identity's group.
  id_labels, cid, counts = np.unique(labels, return_inverse=True, return_counts=True)
  num_ids = id_labels.size
  id_group = np.empty(num_ids, dtype=np.int64)
  id_group[cid] = groups
  clash = id_group[cid] != groups
  if clash.any():
    row = int(np.argmax(clash))
    first = int(np.argmax(cid == cid[row]))
    raise UserError(f"identity/group: identity {int(labels[row])} is in group "
                    f"{int(groups[first])} at row {first} and in group {int(groups[row])} at "
                    f"row {row}; every identity must belong to one group")

  # The fixed sample: rows of identities with >= 2 images, sorted.
  eligible = np.flatnonzero(counts[cid] >= 2)
  sampled = eligible[fixed_sample(eligible.size, sample, seed)]
  sample_rows = np.empty((sampled.size, features), dtype=dtype)

  # One pass: per-identity sums of unit rows and of their squared norms (~1), sampled rows.
  sums = np.zeros((num_ids, features), dtype=np.float64)
  sq_norms = np.zeros(num_ids, dtype=np.float64)
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    x = _normalized_rows(embeddings[start:stop], start, dtype, "embeddings")
    ids = cid[start:stop]
    sq_norms += np.bincount(ids, weights=np.einsum("ij,ij->i", x, x), minlength=num_ids)
    if ids.size > 1 and np.any(ids[1:] < ids[:-1]):
      order = np.argsort(ids, kind="stable")
      ids, x_sorted = ids[order], x[order]
    else:
      x_sorted = x
    heads = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums[ids[heads]] += np.add.reduceat(x_sorted, heads, axis=0, dtype=np.float64)
    del x_sorted
    lo, hi = np.searchsorted(sampled, [start, stop])
    sample_rows[lo:hi] = x[sampled[lo:hi] - start]
    del x

  # Within identity, from the sums: sum over ordered pairs i != j of x_i.x_j = ||s||^2 - sum ||x_i||^2.
  sum_sq = np.einsum("ij,ij->i", sums, sums)
  multi = counts >= 2
  within_k = np.full(num_ids, np.nan)
  within_k[multi] = ((sum_sq[multi] - sq_norms[multi])
                     / (counts[multi] * (counts[multi] - 1.0)))

  # Between images of different identities of one group, from per-group sums U_g of the
  # identity sums: sum over ordered pairs = ||U_g||^2 - sum_k ||s_k||^2, over
  # N_g^2 - sum_k n_k^2 pairs.
  group_labels, gidx = np.unique(id_group, return_inverse=True)
  num_groups = group_labels.size
  onehot = (gidx[:, None] == np.arange(num_groups)[None, :]).astype(np.float64)
  image_sums = onehot.T @ sums
  image_pair_sums = (np.einsum("ij,ij->i", image_sums, image_sums)
                     - np.bincount(gidx, weights=sum_sq, minlength=num_groups))
  group_images = np.bincount(gidx, weights=counts, minlength=num_groups).astype(np.float64)
  image_pair_counts = (group_images ** 2
                       - np.bincount(gidx, weights=counts.astype(np.float64) ** 2,
                                     minlength=num_groups))

  # Unit centroids, in place of the sums.
  sum_norm = np.sqrt(sum_sq)
  if np.any(sum_norm == 0):
    k = int(np.argmax(sum_norm == 0))
    raise UserError(f"embeddings: the images of identity {int(id_labels[k])} sum to the zero "
                    "vector; its centroid has no direction")
  centroids = sums
  centroids /= sum_norm[:, None]
  cent_sq = np.einsum("ij,ij->i", centroids, centroids)

  # Between identities, via per-group sums T_g of unit centroids.
  group_sums = onehot.T @ centroids
  m = np.bincount(gidx, minlength=num_groups).astype(np.float64)
  pair_sums = (np.einsum("ij,ij->i", group_sums, group_sums)
               - np.bincount(gidx, weights=cent_sq, minlength=num_groups))
  pair_counts = m * (m - 1.0)
  same_group = (float(pair_sums.sum() / pair_counts.sum()) if pair_counts.sum() > 0 else None)
  between_groups = None
  if num_groups >= 2:
    total = group_sums.sum(axis=0)
    cross = float(total @ total - np.einsum("ij,ij->i", group_sums, group_sums).sum())
    cross_count = float(m.sum() ** 2 - (m ** 2).sum())
    between_groups = cross / cross_count

  within = _mean_or_none(within_k[multi])
  between_images = (float(image_pair_sums.sum() / image_pair_counts.sum())
                    if image_pair_counts.sum() > 0 else None)
  per_group = {}
  for g, label in enumerate(group_labels):
    in_g = gidx == g
    w = _mean_or_none(within_k[in_g & multi])
    b = float(pair_sums[g] / pair_counts[g]) if pair_counts[g] > 0 else None
    bi = (float(image_pair_sums[g] / image_pair_counts[g]) if image_pair_counts[g] > 0
          else None)
    per_group[int(label)] = {"within_identity": w, "between_identities_same_group": b,
                             "between_images_same_group": bi,
                             "separation": _difference(w, bi)}

  return {
      "within_identity": within,
      "between_identities_same_group": same_group,
      "between_images_same_group": between_images,
      "between_groups": between_groups,
      "separation": _difference(within, between_images),
      "nearest_centroid_accuracy": _nearest_centroid_accuracy(
          sample_rows, cid[sampled], centroids, sum_norm),
      "num_images": int(n),
      "num_identities": int(num_ids),
      "num_sampled": int(sampled.size),
      "per_group": per_group,
  }


def _nearest_centroid_accuracy(rows: np.ndarray, own: np.ndarray, centroids: np.ndarray,
                               sum_norm: np.ndarray) -> float | None:
  """Fraction of unit `rows` [S, F] whose nearest centroid, with their own identity's centroid
  replaced by its leave-one-out version, is their own identity `own` [S]; None if S = 0.

  centroids: unit [I, F] float64; sum_norm: [I] norms of the identities' row sums s_k. The own
  score is x.(s_k - x) / ||s_k - x||, from x.s_k = ||s_k|| x.c_k. Scores are computed in blocks
  of at most _MAX_SCORES entries.
  """
  if rows.shape[0] == 0:
    return None
  num_ids = centroids.shape[0]
  block = max(1, _MAX_SCORES // num_ids)
  correct = 0
  for start in range(0, rows.shape[0], block):
    x = rows[start:start + block].astype(np.float64)
    k = own[start:start + block]
    scores = x @ centroids.T
    at = np.arange(x.shape[0])
    x_dot_s = scores[at, k] * sum_norm[k]
    x_sq = np.einsum("ij,ij->i", x, x)
    rest_sq = np.maximum(sum_norm[k] ** 2 - 2.0 * x_dot_s + x_sq, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
      own_score = np.where(rest_sq > 0, (x_dot_s - x_sq) / np.sqrt(rest_sq), -np.inf)
    scores[at, k] = -np.inf
    correct += int(np.count_nonzero(own_score > scores.max(axis=1)))
    del scores
  return correct / rows.shape[0]


def _pair(a: Any, b: Any) -> tuple[Any, Any]:
  if not hasattr(a, "shape"):
    a = np.asarray(a)
  if not hasattr(b, "shape"):
    b = np.asarray(b)
  if tuple(a.shape) != tuple(b.shape):
    raise UserError(f"cosine: expected two arrays of one shape [N, D], got {tuple(a.shape)} "
                    f"and {tuple(b.shape)}")
  if len(a.shape) != 2 or a.shape[0] < 1 or a.shape[1] < 1:
    raise UserError(f"cosine: expected arrays [N, D] with N, D >= 1, got shape {tuple(a.shape)}")
  _work_dtype(np.dtype(a.dtype), "cosine: first array")
  _work_dtype(np.dtype(b.dtype), "cosine: second array")
  return a, b


def per_row_cosine(a: Any, b: Any, *, chunk: int = 65536) -> np.ndarray:
  """float64 [N]: cosine of a[i] and b[i] for a, b [N, D] of any float dtype (read in chunks).

  Raises UserError on a shape mismatch, a shape other than [N, D] with N, D >= 1, a non-float
  dtype, or a row of norm 0 (cosine undefined).
  """
  a, b = _pair(a, b)
  chunk = max(1, int(chunk))
  out = np.empty(a.shape[0], dtype=np.float64)
  for start in range(0, a.shape[0], chunk):
    x = np.asarray(a[start:start + chunk], dtype=np.float64)
    y = np.asarray(b[start:start + chunk], dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
    if np.any(norms == 0):
      row = start + int(np.argmax(norms == 0))
      raise UserError(f"cosine: row {row} has norm 0 in one of the arrays; its cosine is "
                      "undefined")
    out[start:start + x.shape[0]] = np.einsum("ij,ij->i", x, y) / norms
  return out


def mean_cosine(a: Any, b: Any) -> float:
  """Mean over rows of the cosine of a[i] and b[i]; a, b [N, D] of any float dtype, N >= 1.

  Raises UserError as per_row_cosine.
  """
  return float(per_row_cosine(a, b).mean())
