"""The embed command: a folder or list of a user's images -> L2-normalized embeddings and
their names, equal to an independent computation (PIL decoding and resizing, numpy
normalization, the Flax model applied directly, numpy L2 norm); and its one-line errors.

One tiny IResNet (iresnet18, width 4, embedding 16, 16x16 input) throughout.
"""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from mstkd_jax import embed as embed_lib
from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_checkpoint
from mstkd_jax.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"arch": "iresnet18", "width": 4, "embedding_size": 16, "image_size": 16}
FLAGS = ["--arch=iresnet18", "--width=4", "--embedding_size=16", "--image_size=16"]
# The folder's images: name -> (size, format); the 24x20 one is resized.
TREE = {"alice/01.png": (16, 16, "PNG"), "alice/sub/02.jpg": (16, 16, "JPEG"),
        "bob/03.PNG": (16, 16, "PNG"), "carol.jpeg": (24, 20, "JPEG")}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  module = models.create("iresnet18", width=4, embedding_size=16)
  variables = build.init_variables(module, jax.random.PRNGKey(0),
                                   np.zeros((1, 16, 16, 3), np.float32), train=False)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.uniform(0.5, 2.0, np.shape(x)) if "'var'" in jax.tree_util.keystr(p)
                    else np.asarray(x) + rng.normal(0, 0.2, np.shape(x))).astype(np.float32),
      variables)
  pth = tmp_path_factory.mktemp("model") / "tiny.pth"
  torch_checkpoint.save_state_dict(pth, torch_checkpoint.export_iresnet(variables))
  return {"module": module, "variables": variables, "pth": str(pth)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("faces") / "faces"
  rng = np.random.default_rng(1)
  for name, (h, w, fmt) in TREE.items():
    os.makedirs(os.path.dirname(root / name), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name, fmt)
  # Not images, or hidden: never listed.
  (root / "notes.txt").write_text("not an image")
  os.makedirs(root / ".cache")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / ".cache" / "x.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "._carol.png")
  return str(root)


def _expected(model, paths, flip):
  """PIL decode (RGB) and bilinear resize, numpy normalization, the module applied."""
  batch = []
  for path in paths:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if img.size != (16, 16):
        img = img.resize((16, 16), Image.BILINEAR)
      batch.append(np.asarray(img, np.float32))
  x = (np.stack(batch) / 255.0 - 0.5) / 0.5
  apply = lambda x: np.asarray(model["module"].apply(model["variables"], x, train=False),
                               np.float64)
  raw = apply(x) + (apply(x[:, :, ::-1]) if flip else 0.0)
  return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def _load(path):
  with np.load(path) as data:
    assert sorted(data.files) == ["embeddings", "names"]
    return data["embeddings"], list(data["names"])


@pytest.mark.parametrize("flip", [False, True])
def test_a_folder_gives_the_independent_embeddings_and_relative_names(model, images, flip,
                                                                      tmp_path, capsys):
  out = tmp_path / "emb.npz"
  summary = embed_lib.embed(model["pth"], ARCH, images, out, flip=flip, batch_size=16)
  embeddings, names = _load(out)
  assert names == sorted(TREE)
  assert embeddings.dtype == np.float32 and embeddings.shape == (len(TREE), 16)
  expected = _expected(model, [os.path.join(images, n) for n in names], flip)
  np.testing.assert_allclose(embeddings, expected, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
  # One warning, naming the size found and the model's.
  warnings = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning:")]
  assert len(warnings) == 1 and summary["warnings"] == [warnings[0][len("warning: "):]]
  assert "1 of 4 images of 24x20 pixels, the model takes 16x16" in warnings[0]
  assert summary["resized"] == {"24x20": 1} and summary["flip"] is flip


def test_a_list_file_names_rows_as_written(model, images, tmp_path):
  listing = tmp_path / "lists" / "faces.txt"
  os.makedirs(listing.parent)
  relative = os.path.relpath(os.path.join(images, "bob", "03.PNG"), listing.parent)
  absolute = os.path.join(images, "alice", "01.png")
  listing.write_text(f"# my faces\n{relative}\n\n  {absolute}  \n{relative}\n")
  out = tmp_path / "emb.npz"
  embed_lib.embed(model["pth"], ARCH, str(listing), str(out), batch_size=16, verbose=False)
  embeddings, names = _load(out)
  assert names == [relative, absolute, relative]
  expected = _expected(model, [os.path.join(images, "bob", "03.PNG"), absolute,
                               os.path.join(images, "bob", "03.PNG")], flip=False)
  np.testing.assert_allclose(embeddings, expected, atol=2e-6)


def test_chunks_keep_the_order(model, images, tmp_path, monkeypatch):
  monkeypatch.setattr(embed_lib, "CHUNK_IMAGES", 1)  # One image a chunk (the batch: 1).
  out = tmp_path / "emb.npz"
  embed_lib.embed(model["pth"], ARCH, images, out, batch_size=1, flip=True, verbose=False)
  embeddings, names = _load(out)
  expected = _expected(model, [os.path.join(images, n) for n in names], flip=True)
  np.testing.assert_allclose(embeddings, expected, atol=2e-6)


def test_an_undecodable_image_is_named_and_nothing_is_written(model, images, tmp_path):
  broken = tmp_path / "broken"
  os.makedirs(broken)
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(broken / "a.png")
  (broken / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  out = tmp_path / "emb.npz"
  with pytest.raises(UserError) as info:
    embed_lib.embed(model["pth"], ARCH, str(broken), out, batch_size=16, verbose=False)
  assert str(broken / "b.jpg") in str(info.value)
  assert not out.exists() and os.listdir(tmp_path) == ["broken"]


# --- Command line ----------------------------------------------------------------------


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mstkd_jax.embed", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_command_line_writes_the_same_file(model, images, tmp_path):
  out = tmp_path / "cli.npz"
  result = _cli(f"--checkpoint={model['pth']}", *FLAGS, f"--images={images}",
                f"--out={out}", "--flip", "--batch_size=8")
  assert result.returncode == 0, result.stderr
  assert f"Wrote {out}: 4 L2-normalized embeddings" in result.stdout
  assert len([l for l in result.stderr.splitlines() if l.startswith("warning:")]) == 1
  embeddings, names = _load(out)
  expected = _expected(model, [os.path.join(images, n) for n in names], flip=True)
  np.testing.assert_allclose(embeddings, expected, atol=2e-6)


def test_command_line_errors_are_one_line(model, images, tmp_path):
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub")
  (empty / "sub" / "readme.txt").write_text("no images")
  listing = tmp_path / "list.txt"
  listing.write_text("faces/a.png\nmissing/b.png\n")
  os.makedirs(tmp_path / "faces")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "faces" / "a.png")
  out = tmp_path / "e.npz"
  cases = [
      ([f"--images={empty}"], 1, f"{empty}: the images folder holds no images"),
      ([f"--images={listing}"], 1,
       f"{listing} line 2: {tmp_path / 'missing' / 'b.png'} does not exist"),
      ([f"--images={tmp_path / 'faces' / 'a.png'}"], 1, "is an image; expected a folder"),
      ([f"--images={tmp_path / 'nope'}"], 1, "does not exist"),
      ([f"--images={images}", "--batch_size=0"], 2, "--batch_size=0"),
      ([], 2, "--images"),
  ]
  for args, code, text in cases:
    result = _cli(f"--checkpoint={model['pth']}", *FLAGS, *args, f"--out={out}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (args, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error") and text in lines[0], (
        args, result.stderr)
  assert not out.exists()
