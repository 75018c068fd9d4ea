"""Any ONNX recognition model as evaluate's and embed's --checkpoint (onnxruntime).

The reference is the export's own model: a tiny IResNet (iresnet18, width 4, embedding 16,
16x16 input) saved as a .pth, exported to ONNX, and evaluated both ways on the same RFW
folder. A second graph is made model-zoo-like from the first (MXNet-style input name,
normalization inside the graph by leading "_minus"/"_mul" nodes, raw 0..255 pixels in, a
fixed batch of 1, no metadata), as insightface's downloaded recognition models are.

(About 40 s: the export in the fixture is the converter's first use in the process, which
costs 15-25 s, as in test_export.py.)
"""

import os

import numpy as np
import pytest

from mstkd_jax import embed as embed_lib
from mstkd_jax import evaluate as evaluate_lib
from mstkd_jax import export as export_lib
from mstkd_jax.data import synthetic
from mstkd_jax.errors import UserError
from mstkd_jax.interop import command_line, onnx_model, resolve, torch_checkpoint
from test_evaluate import ARCH, BATCH, SPEC, _random_variables

# Export's own check: onnxruntime against JAX within this max relative error (float32
# rounding over ~20 layers of a width-4 net, far below it in practice).
MAX_RELATIVE_ERROR = export_lib.MAX_RELATIVE_ERROR


def _model_zoo_like(proto):
  """The graph with a raw-pixel input "data" [1, 3, 16, 16], normalized inside by a Sub and
  a Mul named as MXNet exports name them, output renamed "fc1", metadata dropped."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  graph = proto.graph
  old_input = graph.input[0].name
  graph.input.remove(graph.input[0])
  graph.input.insert(0, helper.make_tensor_value_info("data", onnx.TensorProto.FLOAT,
                                                      [1, 3, 16, 16]))
  graph.initializer.extend([numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                            numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale")])
  lead = [helper.make_node("Sub", ["data", "mean"], ["centred"], name="_minus0"),
          helper.make_node("Mul", ["centred", "scale"], [old_input], name="_mul0")]
  nodes = lead + list(graph.node)
  del graph.node[:]
  graph.node.extend(nodes)
  old_output = graph.output[0].name
  for node in graph.node:
    node.output[:] = ["fc1" if o == old_output else o for o in node.output]
  graph.output[0].name = "fc1"
  del proto.metadata_props[:]
  onnx.checker.check_model(proto)
  return proto


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """The .pth, its ONNX export, the model-zoo-like graph, and an RFW folder of 16x16 pairs."""
  import onnx  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("onnx")
  pth = root / "tiny.pth"
  torch_checkpoint.save_state_dict(pth, torch_checkpoint.export_iresnet(_random_variables()))
  ours = root / "tiny.onnx"
  export_lib.export(str(pth), ARCH, str(ours), verbose=False)
  zoo = root / "zoo_like.onnx"
  onnx.save(_model_zoo_like(onnx.load(str(ours))), str(zoo))
  synthetic.export_rfw(synthetic.generate(SPEC), root / "rfw")
  return {"pth": str(pth), "ours": str(ours), "zoo": str(zoo), "rfw": str(root / "rfw"),
          "root": root}


def _evaluate(checkpoint, arch, models, out):
  return evaluate_lib.evaluate(checkpoint, arch, [models["rfw"]], str(out), verbose=False,
                               batch_size=BATCH)


def _accuracies(report):
  (entry,) = report["models"].values()
  return {g: (e["accuracy"], e["accuracy_noflip"]) for g, e in entry["groups"].items()}


def test_an_onnx_export_evaluates_as_its_own_jax_model(models, tmp_path):
  jax_report = _evaluate(models["pth"], ARCH, models, tmp_path / "jax")
  for name in ("ours", "zoo"):
    report = _evaluate(models[name], None, models, tmp_path / name)
    assert _accuracies(report) == _accuracies(jax_report), name
    assert report["config"]["checkpoint_format"] == "onnx"
    assert report["config"]["model"]["image_size"] == 16
    assert report["config"]["model"]["embedding_size"] == 16
  assert len({a for pair in _accuracies(jax_report).values() for a in pair}) > 1
  # Our export's metadata names its architecture; a stock graph's does not.
  ours = _evaluate(models["ours"], None, models, tmp_path / "ours_again")
  assert ours["config"]["model"]["arch"] == "iresnet18"
  assert ours["config"]["model_settings_from"]["image_size"] == "onnx graph"


def test_the_input_convention_is_read_from_the_graph(models):
  _, ours = onnx_model.read_graph(models["ours"])
  _, zoo = onnx_model.read_graph(models["zoo"])
  assert (ours.input_name, ours.batch, ours.height, ours.mean, ours.std) == (
      "input", None, 16, 127.5, 127.5)
  assert (zoo.input_name, zoo.output_name, zoo.batch, zoo.height, zoo.mean, zoo.std) == (
      "data", "fc1", 1, 16, 0.0, 1.0)


def test_embed_takes_an_onnx_checkpoint(models, tmp_path):
  folder = tmp_path / "faces"
  data = os.path.join(models["rfw"], "test", "data", "group_a")
  os.symlink(data, folder)
  got = {}
  for name, arch in (("pth", ARCH), ("ours", None), ("zoo", None)):
    out = tmp_path / f"{name}.npz"
    embed_lib.embed(models[name], arch, str(folder), str(out), flip=True, verbose=False,
                    batch_size=BATCH)
    with np.load(out) as npz:
      got[name] = (npz["embeddings"], list(npz["names"]))
  for name in ("ours", "zoo"):
    assert got[name][1] == got["pth"][1]
    assert export_lib.max_relative_error(got[name][0], got["pth"][0]) <= MAX_RELATIVE_ERROR


def test_model_flags_that_do_not_apply_to_a_graph_are_refused(models, tmp_path):
  with pytest.raises(command_line.FlagError,
                     match="--arch, --width: an ONNX model's architecture"):
    resolve.load_model(models["ours"], resolve.ArchSettings(arch="iresnet34", width=64))
  with pytest.raises(command_line.FlagError,
                     match="--image_size=32: the ONNX graph .* takes 16x16"):
    resolve.load_model(models["ours"], resolve.ArchSettings(image_size=32))
  with pytest.raises(command_line.FlagError, match="is an ONNX model already"):
    export_lib.export(models["ours"], None, str(tmp_path / "again.onnx"), verbose=False)
  text = tmp_path / "notes.onnx"
  text.write_text("not a graph")
  with pytest.raises(UserError, match="not a readable ONNX model"):
    resolve.load_model(str(text), resolve.ArchSettings())
