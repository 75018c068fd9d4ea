"""5-point alignment (formats/align.py): the template, recovery of a known similarity transform,
the command line end to end, and the one-line errors of bad landmarks files."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from skimage.transform import SimilarityTransform, warp

from mstkd_jax.data import synthetic
from mstkd_jax.formats import align
from mstkd_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOT_SIGMA = 2.0   # pixels of the 112 template
DOT_RADIUS = 9    # the face is replaced by the dot within this radius
WINDOW = 6        # centroid window radius


def synthetic_face(index: int = 0) -> np.ndarray:
  """A 112x112 uint8 face of the built-in synthetic set (deterministic)."""
  spec = synthetic.SyntheticSpec(num_groups=1, identities_per_group=2, images_per_identity=2,
                                 eval_identities_per_group=2, eval_images_per_identity=2,
                                 pairs_per_group=2, image_size=112)
  return synthetic.generate(spec).train_images[index % 4]


def with_dots(face: np.ndarray) -> np.ndarray:
  """The face with a white Gaussian dot (on black) centred on each template landmark."""
  out = face.astype(np.float64).copy()
  yy, xx = np.mgrid[:face.shape[0], :face.shape[1]]
  for x, y in align.ARCFACE_TEMPLATE:
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    inside = d2 <= DOT_RADIUS ** 2
    out[inside] = (255.0 * np.exp(-d2 / (2 * DOT_SIGMA ** 2)))[inside][:, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def place(face112: np.ndarray, scale: float, angle_deg: float, shift, canvas):
  """Puts an aligned 112x112 face on a larger canvas by a known similarity transform.

  Returns:
    (photo uint8 [H, W, 3], its landmarks float [5, 2] = the transform of the template).
  """
  transform = SimilarityTransform(scale=scale, rotation=np.deg2rad(angle_deg),
                                  translation=shift)
  photo = warp(face112, transform.inverse, output_shape=canvas, order=1, mode="constant",
               cval=0.0, preserve_range=True)
  return (np.clip(np.rint(photo), 0, 255).astype(np.uint8),
          transform(align.ARCFACE_TEMPLATE))


def dot_centroids(aligned: np.ndarray, size: int = 112) -> np.ndarray:
  """Intensity centroids [5, 2] (x, y) of the dots near each template point."""
  gray = aligned.astype(np.float64).mean(axis=2)
  out = []
  for x, y in align.template(size):
    cx, cy = int(round(x)), int(round(y))
    patch = gray[cy - WINDOW:cy + WINDOW + 1, cx - WINDOW:cx + WINDOW + 1]
    yy, xx = np.mgrid[cy - WINDOW:cy + WINDOW + 1, cx - WINDOW:cx + WINDOW + 1]
    out.append([(patch * xx).sum() / patch.sum(), (patch * yy).sum() / patch.sum()])
  return np.array(out)


def test_template_follows_insightface_scaling():
  np.testing.assert_allclose(align.template(112), align.ARCFACE_TEMPLATE)
  np.testing.assert_allclose(align.template(224), 2 * align.ARCFACE_TEMPLATE)
  # Multiples of 128: scaled by size/128 and shifted right by 8 size/128 (insightface).
  np.testing.assert_allclose(align.template(128), align.ARCFACE_TEMPLATE + [8.0, 0.0])
  np.testing.assert_allclose(align.template(256), 2 * align.ARCFACE_TEMPLATE + [16.0, 0.0])
  # Other sizes (insightface asserts): scaled by size/112.
  np.testing.assert_allclose(align.template(32), align.ARCFACE_TEMPLATE * 32 / 112)


@pytest.mark.parametrize("scale,angle,shift,canvas", [
    (1.7, 20.0, (40.0, 15.0), (240, 260)),
    (0.8, -35.0, (10.0, 70.0), (160, 150)),
    (2.6, 5.0, (-30.0, -20.0), (300, 300)),
])
def test_alignment_recovers_the_template(scale, angle, shift, canvas):
  """A face whose landmarks are a known similarity transform of the template comes back
  with its dots on the template (within 0.5 px), and the estimated transform is that
  transform's inverse."""
  photo, landmarks = place(with_dots(synthetic_face()), scale, angle, shift, canvas)
  transform = align.estimate_transform(landmarks)
  np.testing.assert_allclose(transform(landmarks), align.ARCFACE_TEMPLATE, atol=1e-6)
  assert transform.scale == pytest.approx(1.0 / scale)
  aligned = align.align_face(photo, landmarks)
  assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
  error = np.abs(dot_centroids(aligned) - align.ARCFACE_TEMPLATE).max()
  assert error < 0.5, error
  # Bigger crops: the dots land on the scaled template.
  aligned = align.align_face(photo, landmarks, size=224)
  assert np.abs(dot_centroids(aligned, 224) - align.template(224)).max() < 0.5


def _make_folder(tmp_path):
  src = tmp_path / "photos"
  (src / "person_b").mkdir(parents=True)
  face = with_dots(synthetic_face(1))
  settings = {"a.jpg": (1.5, 10.0, (30.0, 20.0)), "person_b/b1.png": (1.2, -15.0, (20.0, 40.0)),
              "person_b/b2.png": (2.0, 30.0, (80.0, 5.0))}
  lines = []
  for name, (scale, angle, shift) in settings.items():
    photo, landmarks = place(face, scale, angle, shift, (260, 240))
    Image.fromarray(photo).save(src / name, quality=98)
    lines.append(name + " " + " ".join(f"{v:.4f}" for v in landmarks.ravel()))
  return src, lines


def test_command_line_aligns_a_folder(tmp_path, capsys):
  src, lines = _make_folder(tmp_path)
  landmarks = tmp_path / "landmarks.txt"
  landmarks.write_text("\n".join(lines) + "\n\n")
  dst = tmp_path / "aligned"
  assert align.main([f"--src={src}", f"--landmarks={landmarks}", f"--dst={dst}"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["images"] == 3 and summary["size"] == 112
  for name in ("a.png", "person_b/b1.png", "person_b/b2.png"):
    aligned = np.asarray(Image.open(dst / name))
    assert aligned.shape == (112, 112, 3)
    # JPEG and PNG alike: the dots are back on the template.
    assert np.abs(dot_centroids(aligned) - align.ARCFACE_TEMPLATE).max() < 0.5
  assert not [p for p in os.listdir(dst) if p.startswith(".")]  # no temporary files left
  # The same as JSON ({name: [[x, y] x 5]}), by `python -m`, at another size.
  as_json = {line.split()[0]: np.array(line.split()[1:], float).reshape(5, 2).tolist()
             for line in lines}
  landmarks_json = tmp_path / "landmarks.json"
  landmarks_json.write_text(json.dumps(as_json))
  result = subprocess.run(
      [sys.executable, "-m", "mstkd_jax.formats.align", f"--src={src}",
       f"--landmarks={landmarks_json}", f"--dst={tmp_path / 'aligned64'}", "--size=64"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert np.asarray(Image.open(tmp_path / "aligned64" / "a.png")).shape == (64, 64, 3)


def _error(tmp_path, capsys, src, text, name="landmarks.txt"):
  path = tmp_path / name
  path.write_text(text)
  assert align.main([f"--src={src}", f"--landmarks={path}",
                     f"--dst={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert str(path) in err
  assert not (tmp_path / "out").exists()
  return err


def test_bad_landmarks_files_stop_with_one_line(tmp_path, capsys):
  src, lines = _make_folder(tmp_path)
  # Fewer lines than images; a name with no image.
  err = _error(tmp_path, capsys, src, "\n".join(lines[:2]))
  assert "2 landmark sets for 3 images" in err and "person_b/b2.png" in err
  err = _error(tmp_path, capsys, src, "\n".join(lines + ["c.jpg" + lines[0][5:]]))
  assert "4 landmark sets for 3 images" in err and "c.jpg" in err
  err = _error(tmp_path, capsys, src, "\n".join(lines[:2] + ["other.jpg" + lines[2][15:]]))
  assert "person_b/b2.png" in err and "other.jpg" in err
  # A line that does not parse: file and line number.
  err = _error(tmp_path, capsys, src, "\n".join([lines[0], "", "person_b/b1.png 1 2 x 4 5 6 "
                                                 "7 8 9 10", lines[2]]))
  assert "line 3" in err and "does not parse" in err
  err = _error(tmp_path, capsys, src, "\n".join([lines[0], "person_b/b1.png 1 2 3"]))
  assert "line 2" in err and "4 fields" in err
  err = _error(tmp_path, capsys, src, "\n".join(lines + [lines[1]]))
  assert "line 4" in err and "listed again (first at line 2)" in err
  # Degenerate landmark sets.
  collinear = "person_b/b1.png " + " ".join(f"{10 + 3 * i} {20 + 5 * i}" for i in range(5))
  err = _error(tmp_path, capsys, src, "\n".join([lines[0], collinear, lines[2]]))
  assert "line 2 (person_b/b1.png)" in err and "collinear" in err
  zero = "person_b/b1.png " + " ".join(["50 60"] * 5)
  err = _error(tmp_path, capsys, src, "\n".join([lines[0], zero, lines[2]]))
  assert "line 2 (person_b/b1.png)" in err and "zero scale" in err
  nan = "person_b/b1.png " + " ".join(["nan"] + lines[1].split()[2:])
  err = _error(tmp_path, capsys, src, "\n".join([lines[0], nan, lines[2]]))
  assert "line 2" in err and "NaN" in err
  # JSON: a bad entry is named.
  err = _error(tmp_path, capsys, src, json.dumps({"a.jpg": [[1, 2], [3, 4]]}), "lm.json")
  assert "entry 'a.jpg'" in err and "5 [x, y] points" in err
  err = _error(tmp_path, capsys, src, "{not json", "lm2.json")
  assert "not valid JSON" in err


def test_degenerate_landmarks_in_python():
  with pytest.raises(UserError, match="collinear"):
    align.estimate_transform(np.stack([np.linspace(0, 40, 5), np.linspace(0, 40, 5)], 1))
  with pytest.raises(UserError, match="zero scale"):
    align.estimate_transform(np.zeros((5, 2)))
  with pytest.raises(UserError, match="10 numbers"):
    align.estimate_transform(np.zeros((4, 2)))
  with pytest.raises(UserError, match=r"\[H, W, 3\]"):
    align.align_face(np.zeros((20, 20), np.uint8), align.ARCFACE_TEMPLATE)


def test_an_eleventh_number_is_a_score_last_or_a_label_first(tmp_path):
  """IJB's `name x1 .. y5 score` and RFW's `path label x1 .. y5` are both read (the form
  decided for the whole file); a file whose 11th numbers fit neither is refused, not read
  with the label as x1 and y5 dropped as a score."""
  from mstkd_jax.formats import landmarks  # pylint: disable=g-import-not-at-top
  points = [align.ARCFACE_TEMPLATE * 2 + 30, align.ARCFACE_TEMPLATE * 1.5 + 10]
  text = lambda p: " ".join(f"{v:.4f}" for v in p.ravel())
  scored = tmp_path / "scored.txt"
  scored.write_text(f"a.jpg {text(points[0])} 0.98\nb.jpg {text(points[1])} 1\n")
  labelled = tmp_path / "labelled.txt"
  labelled.write_text(f"/test/data/African/m.0a/m.0a_0001.jpg\t0\t{text(points[0])}\n"
                      f"/test/data/African/m.0b/m.0b_0002.jpg\t1\t{text(points[1])}\n")
  got = landmarks.read_landmarks(str(scored))
  np.testing.assert_allclose(got["a.jpg"], points[0], atol=1e-4)
  np.testing.assert_allclose(got["b.jpg"], points[1], atol=1e-4)
  got = landmarks.read_landmarks(str(labelled))
  np.testing.assert_allclose(got["/test/data/African/m.0b/m.0b_0002.jpg"], points[1],
                             atol=1e-4)
  matched, unknown = landmarks.match_names(["m.0a/m.0a_0001.jpg", "m.0b/m.0b_0002.jpg"], got,
                                           "labelled.txt")
  assert unknown == [] and matched["m.0a/m.0a_0001.jpg"].startswith("/test/data/")
  neither = tmp_path / "neither.txt"
  neither.write_text(f"a.jpg 0 {text(points[0])}\nb.jpg 3.5 {text(points[1])}\n")
  with pytest.raises(UserError, match=r"neither.txt line 2: 11 numbers whose first, 3.5, is no "
                                      r"integer label, in a file whose line 1 ends with"):
    landmarks.read_landmarks(str(neither))
