"""IJB-B/C 1:1 template verification: the release reader (formats/ijb.py), alignment of its
loose crops, the protocol (evaluation/ijb_protocol.py) against an independent numpy computation,
evaluate --ijb (alone and next to group data), and the one-line errors of bad releases.

The miniature release: 8 subjects of the synthetic set (112x112, a dot on each template
landmark), 2 templates each, every template of 2 media (1 and 2 images), each image put on
a 200x190 canvas by its own known similarity transform (its landmarks), every template pair
listed. The model is a tiny random IResNet (width 4, 16x16 input: the crops are resized).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from mstkd_jax import evaluate as evaluate_lib
from mstkd_jax import models
from mstkd_jax.data import pairs as pairs_lib, synthetic
from mstkd_jax.formats import align, ijb as ijb_data
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding, ijb_protocol as protocol
from mstkd_jax.interop import torch_checkpoint
from mstkd_jax.train import build, parallel as parallel_lib

from test_align import dot_centroids, place, with_dots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"arch": "iresnet18", "width": 4, "embedding_size": 16, "image_size": 16}
SUBJECTS = 8
BATCH = 64


def _write_release(root, faces, identity):
  """Writes the miniature IJBC release under root; returns its rows and pairs."""
  rng = np.random.default_rng(0)
  (root / "meta").mkdir(parents=True)
  (root / "loose_crop").mkdir()
  rows = []  # (name, template, media, landmarks, score)
  by_subject = {s: list(np.flatnonzero(identity == s)) for s in range(SUBJECTS)}
  media = 1000
  for s in range(SUBJECTS):
    images = iter(by_subject[s])
    for t in range(2):
      template = 10 * s + t + 1
      for count in (1, 2):
        media += 1
        for _ in range(count):
          i = next(images)
          scale, angle = rng.uniform(0.8, 1.2), rng.uniform(-25, 25)
          shift = rng.uniform(20, 40, size=2)
          photo, landmarks = place(with_dots(faces[i]), scale, angle, shift, (200, 190))
          name = f"{len(rows) + 1}.{'jpg' if len(rows) % 3 else 'png'}"
          Image.fromarray(photo).save(root / "loose_crop" / name, quality=97)
          rows.append((name, template, media, landmarks, float(rng.uniform(0.5, 1.0))))
  templates = sorted({r[1] for r in rows})
  pair_list = [(a, b, int(a // 10 == b // 10)) for k, a in enumerate(templates)
               for b in templates[k + 1:]]
  (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
      "".join(f"{n} {t} {m}\n" for n, t, m, _, _ in rows))
  (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(
      f"{n} " + " ".join(f"{v:.6f}" for v in lm.ravel()) + f" {s:.6f}\n"
      for n, _, _, lm, s in rows))
  (root / "meta" / "ijbc_template_pair_label.txt").write_text(
      "".join(f"{a} {b} {l}\n" for a, b, l in pair_list))
  return rows, pair_list


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  spec = synthetic.SyntheticSpec(num_groups=1, identities_per_group=SUBJECTS,
                                 images_per_identity=6, eval_identities_per_group=2,
                                 eval_images_per_identity=2, pairs_per_group=2, image_size=112)
  faces = synthetic.generate(spec)
  root = tmp_path_factory.mktemp("ijb") / "IJBC"
  rows, pair_list = _write_release(root, faces.train_images, faces.train_identity)
  return {"root": root, "rows": rows, "pairs": pair_list}


@pytest.fixture(scope="module")
def model(tmp_path_factory, release):
  """A .pth of a random tiny IResNet whose embedding BatchNorm standardizes the fixture's
  embeddings (a random net's raw embeddings are nearly constant)."""
  module = models.create("iresnet18", width=4, embedding_size=16)
  variables = build.init_variables(module, jax.random.PRNGKey(3),
                                   np.zeros((1, 16, 16, 3), np.float32), train=False)
  data = ijb_data.read_release(str(release["root"]))
  images = np.concatenate(list(ijb_data.aligned_chunks(data, 16)))
  out, _ = embedding.embed_images(variables, module, images, parallel_lib.get("pmap", 0), BATCH)
  stats, bias = variables["batch_stats"]["features"], variables["params"]["features"]["bias"]
  raw = (out - bias) * np.sqrt(stats["var"] + 1e-5) + stats["mean"]
  stats["mean"], stats["var"] = raw.mean(0), raw.var(0)
  path = tmp_path_factory.mktemp("model") / "tiny.pth"
  torch_checkpoint.save_state_dict(path, torch_checkpoint.export_iresnet(variables))
  return {"path": str(path), "variables": variables, "module": module}


# --- An independent computation of the protocol -------------------------------------------


def _reference_tar(features, templates, medias, pair_list, far_grid):
  """insightface's protocol with loops and an explicit threshold sweep (float64)."""
  by_template = {}
  for f, t, m in zip(features.astype(np.float64), templates, medias):
    by_template.setdefault(t, {}).setdefault(m, []).append(f)
  template_feature = {}
  for t, media in by_template.items():
    total = sum(np.mean(media[m], axis=0) for m in media)
    template_feature[t] = total / np.linalg.norm(total)
  scores = np.array([template_feature[a] @ template_feature[b] for a, b, _ in pair_list])
  labels = np.array([l for _, _, l in pair_list])
  # False and true accepts at every distinct score taken as threshold (score >= threshold
  # accepts), highest first.
  false, true = [], []
  for threshold in np.unique(scores)[::-1]:
    accepted = scores >= threshold
    false.append(np.sum(accepted & (labels == 0)))
    true.append(np.sum(accepted & (labels == 1)))
  false, true = np.array(false), np.array(true)
  # insightface calls roc_curve with its default drop_intermediate=True, which keeps only
  # the corners: points where the step to the next point differs from the step before
  # (first and last kept). TAR@FAR reads the point closest to the FAR among those, so the
  # corners matter; then the point where nothing is accepted is put first.
  step_changes = np.r_[True, (np.diff(false, 2) != 0) | (np.diff(true, 2) != 0), True]
  fpr = np.r_[0.0, false[step_changes] / np.sum(labels == 0)]
  tpr = np.r_[0.0, true[step_changes] / np.sum(labels == 1)]
  out = {}
  for far in far_grid:
    closest = np.abs(fpr - far)
    out[far] = tpr[np.flatnonzero(closest == closest.min())].max()
  return out


def _reference_features(embeddings, flipped, scores, flip, weighted):
  features = embeddings + flipped if flip else embeddings.copy()
  return features * scores[:, None] if weighted else features


def test_protocol_matches_an_independent_computation():
  """Random embeddings of 300 images in 60 templates of 1-3 media: every variant's TAR
  at every FAR equals the loop-and-sweep computation."""
  rng = np.random.default_rng(1)
  n, subjects = 300, 20
  subject = rng.integers(0, subjects, n)
  templates = subject * 3 + rng.integers(0, 3, n)
  medias = templates * 10 + rng.integers(0, 3, n)
  centres = rng.normal(size=(subjects, 8))
  embeddings = (centres[subject] + rng.normal(scale=1.5, size=(n, 8))).astype(np.float32)
  flipped = (embeddings + rng.normal(scale=0.3, size=(n, 8))).astype(np.float32)
  scores = rng.uniform(0.3, 1.0, n).astype(np.float32)
  ids = np.unique(templates)
  pair_list = [(a, b, int(a // 3 == b // 3)) for k, a in enumerate(ids) for b in ids[k + 1:]]
  pairs = np.array([(a, b) for a, b, _ in pair_list])
  labels = np.array([l for _, _, l in pair_list])
  grid = (1e-3, 1e-2, 3e-2, 1e-1, 0.3)  # FARs the ~1,700 impostor pairs resolve
  result = protocol.evaluate_ijb(embeddings, flipped, scores, templates, medias, pairs, labels)
  assert set(result) == {"flip+score", "flip", "score", "plain"}
  for variant, (flip, weighted) in protocol.VARIANTS.items():
    reference = _reference_tar(_reference_features(embeddings, flipped, scores, flip,
                                                   weighted), templates, medias, pair_list,
                               grid + protocol.FAR_GRID)
    ids_, feats = protocol.template_features(
        protocol.image_features(embeddings, flipped if flip else None,
                                scores if weighted else None),
        templates, medias)
    got = protocol.verify(protocol.pair_scores(ids_, feats, pairs), labels,
                          grid + protocol.FAR_GRID)
    for far in grid + protocol.FAR_GRID:
      assert got["tar_at_far"][protocol.far_key(far)]["tar"] == pytest.approx(reference[far]), (
          variant, far)
    for far in protocol.FAR_GRID:
      key = protocol.far_key(far)
      assert result[variant]["tar_at_far"][key]["tar"] == pytest.approx(reference[far])
  # The variants differ (the flip and the scores enter).
  assert len({r["auc"] for r in result.values()}) == 4


def test_alignment_of_the_fixture_recovers_the_template(release):
  data = ijb_data.read_release(str(release["root"]))
  assert data.name == "IJBC" and len(data.images) == len(release["rows"])
  chunks = list(ijb_data.aligned_chunks(data, 112, chunk=7, workers=3))
  assert [len(c) for c in chunks] == [7] * 6 + [6]
  aligned = np.concatenate(chunks)
  errors = [np.abs(dot_centroids(a) - align.ARCFACE_TEMPLATE).max() for a in aligned]
  assert max(errors) < 0.5, max(errors)
  np.testing.assert_array_equal(data.templates, [r[1] for r in release["rows"]])
  np.testing.assert_allclose(data.landmarks, np.stack([r[3] for r in release["rows"]]),
                             atol=1e-5)


def test_evaluate_ijb_alone_equals_the_independent_protocol(release, model, tmp_path):
  out = tmp_path / "eval"
  report = evaluate_lib.evaluate(model["path"], ARCH, [], str(out), name="tiny",
                                 batch_size=BATCH, verbose=False, ijb=str(release["root"]))
  section = report["ijb"]
  assert report["models"] == {} and section["name"] == "IJBC"
  assert section["data"]["templates"] == 2 * SUBJECTS
  assert section["data"]["genuine"] == SUBJECTS
  assert any("resizing" in w for w in report["config"]["warnings"])
  # The same embeddings, the protocol computed independently.
  data = ijb_data.read_release(str(release["root"]))
  images = np.concatenate(list(ijb_data.aligned_chunks(data, 16)))
  emb, emb_flip = embedding.embed_images(model["variables"], model["module"], images,
                                         parallel_lib.get("pmap", 0), BATCH)
  for variant, (flip, weighted) in protocol.VARIANTS.items():
    reference = _reference_tar(_reference_features(emb, emb_flip, data.scores, flip, weighted),
                               data.templates, data.medias, release["pairs"], protocol.FAR_GRID)
    got = section["models"]["tiny"][variant]["tar_at_far"]
    for far in protocol.FAR_GRID:
      assert got[protocol.far_key(far)] == pytest.approx(100 * reference[far], abs=1e-3), (
          variant, far)
  # Files: the IJB table in report.md, the ROC PNG, the curves in roc_ijb.json.
  written = set(os.listdir(out))
  assert {"report.json", "report.md", "roc_ijb.json", "roc_ijb_IJBC.png"} <= written
  assert "accuracy_by_group.png" not in written
  markdown = (out / "report.md").read_text()
  assert "## IJBC 1:1 template verification" in markdown
  assert "Verification accuracy (%) per group" not in markdown
  stored = json.loads((out / "report.json").read_text())
  assert "roc" not in stored["ijb"]["models"]["tiny"]["flip+score"]
  curves = json.loads((out / "roc_ijb.json").read_text())
  assert set(curves["tiny"]) == set(protocol.VARIANTS)


def test_evaluate_groups_and_ijb_side_by_side(release, model, tmp_path, capsys):
  data = ijb_data.read_release(str(release["root"]))
  images = np.concatenate(list(ijb_data.aligned_chunks(data, 16)))
  subject = data.templates // 10
  rng = np.random.default_rng(0)
  rows = rng.integers(0, len(images), (40, 2))
  groups = {g: pairs_lib.VerificationSet(images, rows, subject[rows[:, 0]] == subject[rows[:, 1]])
            for g in ("group_a", "group_b")}
  out = tmp_path / "eval"
  report = evaluate_lib.evaluate(model["path"], ARCH, [groups], str(out), name="tiny",
                                 batch_size=BATCH, verbose=True, ijb=str(release["root"]),
                                 ijb_name="ijbc")
  assert set(report["models"]["tiny"]["groups"]) == {"group_a", "group_b"}
  assert set(report["ijb"]["models"]["tiny"]) == set(protocol.VARIANTS)
  printed = capsys.readouterr().out
  assert "Verification accuracy (%) per group" in printed and "IJBC 1:1" in printed
  markdown = (out / "report.md").read_text()
  assert "## Verification accuracy (%) per group" in markdown and "## IJBC 1:1" in markdown
  assert {"accuracy_by_group.png", "roc_ijb_IJBC.png"} <= set(os.listdir(out))


# --- Bad releases --------------------------------------------------------------------------


def _copy(release, tmp_path):
  root = tmp_path / "IJBC"
  shutil.copytree(release["root"], root)
  return root


def _edit_line(path, number, text):
  lines = path.read_text().splitlines()
  lines[number - 1] = text
  path.write_text("\n".join(lines) + "\n")


def test_bad_releases_are_named_with_file_and_line(release, tmp_path):
  root = _copy(release, tmp_path)
  meta = root / "meta"
  tid, pts, pairs = (meta / "ijbc_face_tid_mid.txt", meta / "ijbc_name_5pts_score.txt",
                     meta / "ijbc_template_pair_label.txt")
  originals = {p: p.read_text() for p in (tid, pts, pairs)}

  def error(**kwargs):
    with pytest.raises(UserError) as e:
      ijb_data.read_release(str(root), **kwargs)
    for p, text in originals.items():
      p.write_text(text)
    assert "\n" not in str(e.value)
    return str(e.value)

  pairs.rename(meta / "moved.txt")
  message = error()
  assert f"{pairs}: missing" in message
  (meta / "moved.txt").rename(pairs)
  _edit_line(pairs, 5, "1 999 0")
  message = error()
  assert f"{pairs} line 5" in message and "template 999 is unknown" in message
  _edit_line(pairs, 3, "1 2")
  assert f"{pairs} line 3: 2 fields" in error()
  _edit_line(pairs, 4, "1 2 x")
  assert f"{pairs} line 4" in error()
  _edit_line(pairs, 6, "1 2 7")
  assert f"{pairs} line 6: label 7" in error()
  name = release["rows"][2][0]
  _edit_line(pts, 3, f"{name} " + " ".join(["nan"] * 10) + " 0.9")
  message = error()
  assert f"{pts} line 3 ({name})" in message and "NaN" in message
  _edit_line(pts, 3, f"{name} 1 2 3 4 5 6 7 8 9 ten 0.9")
  message = error()
  assert f"{pts} line 3" in message and "does not parse" in message
  _edit_line(pts, 2, f"{name} " + " ".join(["1"] * 11))
  assert f"{pts} line 2: names {name}" in error()
  _edit_line(tid, 4, "4.jpg 1")
  assert f"{tid} line 4: 2 fields" in error()
  # An image listed but absent from loose_crop: refused, or skipped and listed.
  (root / "loose_crop" / "5.jpg").unlink()
  message = error()
  assert f"{tid} line 5: 5.jpg is not in" in message and "--skip_missing" in message
  warnings = []
  data = ijb_data.read_release(str(root), skip_missing=True, warn=warnings.append)
  assert data.missing == ["5.jpg"] and len(data.images) == len(release["rows"]) - 1
  assert data.dropped_pairs == 0 and data.summary()["missing_images"] == 1
  assert len(warnings) == 1 and "5.jpg" in warnings[0]
  with pytest.raises(UserError, match="cannot tell IJBB from IJBC"):
    ijb_data.read_release(str(meta))
  with pytest.raises(UserError, match="--ijb_name=IJBX"):
    ijb_data.read_release(str(root), name="ijbx")


def test_command_line_error_is_one_line(release, model, tmp_path):
  root = _copy(release, tmp_path)
  (root / "meta" / "ijbc_face_tid_mid.txt").unlink()
  result = subprocess.run(
      [sys.executable, "-m", "mstkd_jax.evaluate", f"--checkpoint={model['path']}",
       "--arch=iresnet18", "--width=4", "--embedding_size=16", "--image_size=16",
       f"--ijb={root}", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {root / 'meta' / 'ijbc_face_tid_mid.txt'}: missing; expected the IJBC meta "
      "file (the insightface IJB release layout)"]
  assert not (tmp_path / "out").exists()
