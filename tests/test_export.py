"""ONNX export, checked by real clients: onnxruntime gives our JAX embeddings, insightface's
own loader (model_zoo.get_model, get_feat on BGR uint8 images) gives the same directions.

The JAX side is the evaluation path (`evaluation.embedding.embed_images` on uint8 RGB images:
its own normalization), so the graph's input convention is checked too. One tiny IResNet
(iresnet18, width 4, embedding 16) at 112x112, the smallest input insightface routes to its
recognition model, exported once for the file; a 16x16 one with squeeze-excite blocks for
the command line.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mstkd_jax import export as export_lib
from mstkd_jax import models
from mstkd_jax import workdir as workdir_lib
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding
from mstkd_jax.interop import torch_checkpoint
from mstkd_jax.train import build, parallel as parallel_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"arch": "iresnet18", "width": 4, "embedding_size": 16}


def _variables(image_size, seed=0, use_se=False, name="iresnet18"):
  """A tiny backbone's variables (width 4, embedding 16) with non-trivial BatchNorm
  statistics and slopes."""
  module = models.create(name, width=4, embedding_size=16, use_se=use_se)
  variables = build.init_variables(module, jax.random.PRNGKey(seed),
                                   np.zeros((1, image_size, image_size, 3), np.float32),
                                   train=False)
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name, x = jax.tree_util.keystr(path), np.asarray(x)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if "'mean'" in name or "'bias'" in name:
      return rng.normal(0.0, 0.3, x.shape).astype(np.float32)
    if "'scale'" in name or "'alpha'" in name:
      return (x * rng.uniform(0.5, 1.5, x.shape)).astype(np.float32)
    return x
  return module, jax.tree_util.tree_map_with_path(perturb, variables)


def _faces(count, size, seed=0):
  """uint8 RGB [count, size, size, 3]: smooth colour fields plus noise, face-crop-like."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(3 * xx + c) + np.cos(2 * yy * (c + 1)) for c in range(3)], -1)
  images = 127.5 + 60 * base[None] + rng.normal(0, 25, (count, size, size, 3))
  return np.clip(images, 0, 255).astype(np.uint8)


def _ours(module, variables, images):
  """Our JAX embeddings (raw), through the evaluation path."""
  emb, _ = embedding.embed_images(variables, module, images, parallel_lib.get("pmap", 0), 16)
  return emb


def _onnx_and_ours(path, model, images):
  """(onnxruntime's embeddings of `images` from the ONNX file at `path`, ours from
  `model`'s "module" and "variables"), both raw float32 [N, D]."""
  onnx_out = export_lib.onnx_session(str(path)).run(
      None, {"input": export_lib.normalized_nchw(images)})[0]
  return onnx_out, _ours(model["module"], model["variables"], images)


def _cosines(a, b):
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A stage workdir (model/ at step 5, config.json) of a 112x112 model, exported."""
  root = tmp_path_factory.mktemp("export")
  module, variables = _variables(112)
  workdir = root / "student_run"
  workdir_lib.save_model(str(workdir), 5, variables)
  config = {"stage": "student", "model": dict(name="iresnet18", width=4, embedding_size=16,
                                               use_se=False, dropout=0.0, dtype="float32"),
            "data": {"source": "tfds", "image_size": 112}}
  (workdir / "config.json").write_text(json.dumps(config))
  summary = export_lib.export(str(workdir), None, str(root / "out" / "model.onnx"),
                              verbose=False)
  return {"module": module, "variables": variables, "summary": summary,
          "path": summary["path"], "workdir": str(workdir)}


def test_the_graph_follows_the_insightface_convention(exported):
  import onnx  # pylint: disable=g-import-not-at-top
  proto = onnx.load(exported["path"])
  (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert dims(graph_input) == ["N", 3, 112, 112]
  assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  assert dims(graph_output) == ["N", 16]
  assert graph_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
  # BatchNorm in inference mode: ONNX BatchNormalization without training outputs.
  norms = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
  assert norms and all(len(n.output) == 1 for n in norms)
  props = {p.key: p.value for p in proto.metadata_props}
  assert {k: props[k] for k in ("architecture", "width", "embedding_size", "image_size",
                                "use_se", "step", "checkpoint_format")} == {
      "architecture": "iresnet18", "width": "4", "embedding_size": "16",
      "image_size": "112", "use_se": "False", "step": "5", "checkpoint_format": "orbax"}
  assert props["source_checkpoint"] == os.path.join(exported["workdir"], "model", "5")
  assert props["converter"].startswith("jax2onnx ")
  assert json.loads(props["model_settings_from"])["arch"] == "config.json"
  assert float(props["max_relative_error_vs_jax"]) <= export_lib.MAX_RELATIVE_ERROR
  assert exported["summary"]["warnings"] == []
  assert not [f for f in os.listdir(os.path.dirname(exported["path"])) if f != "model.onnx"]


def test_onnxruntime_gives_our_embeddings(exported):
  images = _faces(6, 112)
  onnx_out, ours = _onnx_and_ours(exported["path"], exported, images)
  error = export_lib.max_relative_error(onnx_out, ours)
  print(f"onnxruntime vs JAX: max relative error {error:.3g}")
  assert error <= 1e-4
  # Any batch size: N is dynamic.
  single, _ = _onnx_and_ours(exported["path"], exported, images[:1])
  assert export_lib.max_relative_error(single, ours[:1]) <= 1e-4


def test_insightface_loads_it_and_embeds_bgr_images_as_we_do(exported):
  pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements-dev.txt")
  model_zoo = pytest.importorskip(
      "insightface.model_zoo", reason="insightface (requirements-dev.txt) is not installed")
  import onnx  # pylint: disable=g-import-not-at-top
  model = model_zoo.get_model(exported["path"], providers=["CPUExecutionProvider"])
  assert type(model).__name__ == "ArcFaceONNX"
  assert (model.input_mean, model.input_std) == (127.5, 127.5)
  reading = export_lib.insightface_reading(onnx.load(exported["path"]))
  assert reading == {"routed": True, "input_mean": model.input_mean,
                     "input_std": model.input_std}
  images = _faces(6, 112, seed=1)
  feats = model.get_feat([np.ascontiguousarray(image[:, :, ::-1]) for image in images])
  cosines = _cosines(feats, _ours(exported["module"], exported["variables"], images))
  print(f"insightface vs JAX: min cosine {cosines.min():.8f}")
  assert feats.shape == (6, 16)
  assert cosines.min() >= 0.9999


def test_an_operation_the_converter_cannot_express_is_one_line_naming_it():
  def with_callback(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x).mean((2, 3))
  with pytest.raises(UserError) as info:
    export_lib.convert(with_callback, 16)
  message = str(info.value)
  assert "cannot express the JAX operation 'pure_callback'" in message
  assert "\n" not in message


def test_an_opset_the_converter_gets_wrong_is_refused_naming_the_fix(small_pth):
  # The squeeze-excite gate's mean: jax2onnx 0.17 writes ReduceMean in its opset-18 form.
  fn = export_lib.graph_function(small_pth["module"], small_pth["variables"])
  with pytest.raises(UserError, match=r"not valid ONNX at opset 17 .*try --opset=18"):
    export_lib.convert(fn, 16, opset=17)


def test_importing_it_next_to_evaluate_defines_no_flag_twice():
  from mstkd_jax import evaluate  # pylint: disable=g-import-not-at-top,unused-import
  from mstkd_jax import embed as embed_cli  # pylint: disable=g-import-not-at-top,unused-import
  assert export_lib.export and embed_cli


# --- Command line ----------------------------------------------------------------------


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mstkd_jax.export", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
  # The squeeze-excite variant: its gate (global mean, sigmoid) is converted too.
  module, variables = _variables(16, seed=3, use_se=True)
  pth = tmp_path_factory.mktemp("small") / "r18se_16px.pth"
  torch_checkpoint.save_state_dict(pth, torch_checkpoint.export_iresnet(variables))
  return {"module": module, "variables": variables, "path": str(pth)}


def test_command_line_exports_a_pth_and_warns_where_insightface_will_not_route_it(
    small_pth, tmp_path):
  # (The one command-line export: the converter's first use in a process costs ~15 s.)
  out = tmp_path / "small.onnx"
  result = _cli(f"--checkpoint={small_pth['path']}", "--arch=iresnet18", "--width=4",
                "--embedding_size=16", "--use_se", "--image_size=16", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert f"Wrote {out}" in result.stdout
  warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "will not load this 16x16 model" in warnings[0]
  images = _faces(4, 16)
  onnx_out, ours = _onnx_and_ours(out, small_pth, images)
  assert export_lib.max_relative_error(onnx_out, ours) <= 1e-4
  arcface = pytest.importorskip("insightface.model_zoo.arcface_onnx",
                                reason="insightface (requirements-dev.txt) is not installed")
  direct = arcface.ArcFaceONNX(model_file=str(out))
  feats = direct.get_feat([np.ascontiguousarray(image[:, :, ::-1]) for image in images])
  assert _cosines(feats, ours).min() >= 0.9999


def test_command_line_errors_are_one_line_and_write_nothing(small_pth, exported, tmp_path):
  out = tmp_path / "x.onnx"
  not_a_model = tmp_path / "notes.pth"
  not_a_model.write_text("not a checkpoint")
  head_only = tmp_path / "head_run"
  workdir_lib.save_model(str(head_only), 1, {"params": {"kernel": np.ones((4, 3), np.float32)},
                                             "batch_stats": {}})
  cases = [
      ([f"--checkpoint={not_a_model}"], 1, str(not_a_model)),
      ([f"--checkpoint={head_only}"], 1, "holds no backbone"),
      ([f"--checkpoint={tmp_path / 'missing'}"], 1, "does not exist"),
      ([f"--checkpoint={small_pth['path']}", "--opset=11"], 2, "--opset=11"),
      ([f"--checkpoint={small_pth['path']}", "--arch=resnet9"], 2, "--arch='resnet9'"),
  ]
  for args, code, text in cases:
    result = _cli(*args, f"--out={out}")
    assert result.returncode == code, (args, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (
        args, result.stderr)
  folder = _cli(f"--checkpoint={small_pth['path']}", f"--out={tmp_path}")
  assert folder.returncode == 2 and "is a folder" in folder.stderr
  assert not out.exists()


# --- MobileFaceNet ---------------------------------------------------------------------

MBF = {"width": 4, "embedding_size": 16}  # mbf's blocks (1, 4, 6, 2) and scale 2


@pytest.fixture(scope="module")
def mbf_exported(tmp_path_factory):
  """A tiny mbf at 112x112 (non-trivial BatchNorm statistics) as an arcface_torch .pth,
  exported with no model settings: inferred from the file."""
  root = tmp_path_factory.mktemp("mbf")
  module, variables = _variables(112, seed=4, name="mbf")
  pth = root / "mbf.pth"
  torch_checkpoint.save_state_dict(pth, torch_checkpoint.export_mbf(variables))
  summary = export_lib.export(str(pth), None, str(root / "mbf.onnx"), verbose=False)
  return {"module": module, "variables": variables, "summary": summary, "pth": str(pth)}


def test_an_mbf_pth_exports_with_its_architecture_inferred(mbf_exported):
  # (The converter's first mbf in the process and onnxruntime's check: ~20 s.)
  summary = mbf_exported["summary"]
  assert summary["settings"] == {"arch": "mbf", "width": 4, "embedding_size": 16,
                                 "use_se": False, "image_size": 112}
  props = summary["metadata"]
  assert props["architecture"] == "mbf" and props["checkpoint_format"] == "pytorch"
  assert set(json.loads(props["model_settings_from"]).values()) == {"checkpoint shapes"}
  assert summary["max_relative_error"] <= export_lib.MAX_RELATIVE_ERROR
  images = _faces(6, 112, seed=2)
  onnx_out, ours = _onnx_and_ours(summary["path"], mbf_exported, images)
  error = export_lib.max_relative_error(onnx_out, ours)
  print(f"mbf: onnxruntime vs JAX: max relative error {error:.3g}")
  assert error <= 1e-4
  model_zoo = pytest.importorskip(
      "insightface.model_zoo", reason="insightface (requirements-dev.txt) is not installed")
  model = model_zoo.get_model(summary["path"], providers=["CPUExecutionProvider"])
  feats = model.get_feat([np.ascontiguousarray(image[:, :, ::-1]) for image in images])
  assert _cosines(feats, ours).min() >= 0.9999


def test_an_mbf_loads_from_orbax_and_pth_alike(mbf_exported, tmp_path, capsys):
  from mstkd_jax.interop import resolve  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "mbf_student"
  workdir_lib.save_model(str(workdir), 3, mbf_exported["variables"])
  (workdir / "config.json").write_text(json.dumps(
      {"stage": "student", "model": dict(name="mbf", dropout=0.0, dtype="float32", **MBF),
       "data": {"source": "tfds", "image_size": 112}}))
  orbax = resolve.load_model(str(workdir), resolve.ArchSettings())
  pth = resolve.load_model(mbf_exported["pth"], resolve.ArchSettings())
  assert capsys.readouterr().err == (
      f"note: {mbf_exported['pth']}: no --arch given; its shapes say arch=mbf width=4 "
      "embedding_size=16 use_se=False image_size=112\n")
  assert orbax.settings == pth.settings == resolve.ArchSettings("mbf", 4, 16, False, 112)
  assert set(orbax.origins.values()) == {"config.json", "checkpoint shapes"}
  jax.tree.map(np.testing.assert_array_equal, orbax.variables, pth.variables)
  # Settings that contradict the file: its shapes in the refusal.
  with pytest.raises(UserError) as info:
    resolve.load_model(mbf_exported["pth"], resolve.ArchSettings(arch="mbf", width=8))
  assert "does not fit this MobileFaceNet" in str(info.value)
  assert "looks like: MobileFaceNet blocks (1, 4, 6, 2), scale 2 (mbf), width 4" in str(
      info.value)
