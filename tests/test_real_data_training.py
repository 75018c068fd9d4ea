"""Training and evaluating from prepared (TFDS) data: an image tree and an RFW folder."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from mstkd_jax.data import synthetic
from mstkd_jax.formats import prepare
from mstkd_jax.stages import teacher
from test_teacher_stage import tiny_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The tiny synthetic set written as a BUPT-style image tree and an RFW folder, prepared."""
  root = tmp_path_factory.mktemp("real")
  spec = synthetic.SyntheticSpec(num_groups=2, identities_per_group=8, images_per_identity=6,
                                 eval_identities_per_group=6, eval_images_per_identity=4,
                                 pairs_per_group=40, image_size=16)
  faces = synthetic.generate(spec)
  for i, (image, identity, group) in enumerate(zip(faces.train_images, faces.train_identity,
                                                   faces.train_group)):
    folder = root / "tree" / spec.group_names[group] / f"id{identity:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    (folder / f"{i:05d}.png").write_bytes(buffer.getvalue())
  synthetic.export_rfw(faces, str(root / "RFW"))
  data_dir = str(root / "prepared")
  prepare.prepare("image_tree", str(root / "tree"), data_dir, name="tiny_tree")
  prepare.prepare("rfw", str(root / "RFW"), data_dir, name="tiny_rfw")
  return data_dir


def test_teacher_trains_on_a_prepared_tree_and_verifies_on_prepared_rfw(prepared, tmp_path):
  config = tiny_config()
  config.data.source = "tfds"
  config.data.data_dir = prepared
  config.data.tfds.update(train="tiny_tree", verification="tiny_rfw", image_size=16)
  result = teacher.run(config, str(tmp_path))
  assert int(result["state"].step) == 12          # 48 images of group_a / 16 x 4 epochs
  assert set(result["verification"]) == {"group_a", "group_b"}
  assert os.path.exists(tmp_path / "model")
  accuracies = [r["accuracy"] for r in result["verification"].values()]
  assert all(0.0 <= a <= 1.0 for a in accuracies) and np.isfinite(accuracies).all()
