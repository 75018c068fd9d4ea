"""An ONNX face-recognition model, run by onnxruntime, as a backbone evaluate and embed use.

Any recognition graph in insightface's convention is taken: ours (`python -m
mstkd_jax.export`) and the model_zoo's (e.g. buffalo_l's w600k_r50.onnx). The convention is
what insightface 0.7.3's ArcFaceONNX reads (restated, python-package/insightface/model_zoo/
arcface_onnx.py and model_zoo.py):

* one input, float32 [N, 3, H, W] (NCHW), RGB; the input size is read from the graph (H and
  W fixed there, or --image_size when they are symbolic); N symbolic or a fixed batch;
* the pixels normalized (x - 127.5) / 127.5, unless the graph normalizes them itself: one of
  its first 8 node names starts with "Sub"/"_minus" and one with "Mul"/"_mul" (MXNet
  exports), then it is fed the raw 0..255 values (`insightface_reading`);
* one output, the raw embedding float32 [N, D] (not L2-normalized).

insightface feeds BGR images through cv2.dnn.blobFromImages(swapRB=True), i.e. RGB: images
here are RGB already and go in as they are. The image's and its mirror's embeddings are
computed as for a JAX backbone (evaluation.embedding.embed_images calls `OnnxBackbone.embed`),
on the CPU, in float32.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from mstkd_jax.errors import UserError

# insightface 0.7.3 model_zoo routing: get_model returns an ArcFaceONNX for a square input
# of at least this side, a multiple of 16, other than the sizes below.
INSIGHTFACE_MIN_SIZE = 112
INSIGHTFACE_OTHER_SIZES = {192: "its landmark model"}
SUFFIX = ".onnx"


def insightface_reading(proto) -> dict:
  """How insightface 0.7.3's model_zoo reads a recognition graph (its ModelRouter and
  ArcFaceONNX.__init__, restated): {"routed": get_model returns an ArcFaceONNX,
  "input_mean", "input_std": what get_feat subtracts from and divides pixels by}."""
  size = [d.dim_value if d.HasField("dim_value") else d.dim_param
          for d in proto.graph.input[0].type.tensor_type.shape.dim]
  names = [node.name for node in proto.graph.node[:8]]
  subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
  multiplies = any(n.startswith(("Mul", "_mul")) for n in names)
  side = size[2] if len(size) == 4 and size[2] == size[3] else None
  routed = (isinstance(side, int) and side >= INSIGHTFACE_MIN_SIZE and side % 16 == 0
            and side not in INSIGHTFACE_OTHER_SIZES and len(proto.graph.output) < 5)
  mean, std = (0.0, 1.0) if subtracts and multiplies else (127.5, 127.5)
  return {"routed": routed, "input_mean": mean, "input_std": std}


@dataclasses.dataclass(frozen=True)
class Graph:
  """What a recognition graph takes and gives.

  Attributes:
    input_name, output_name: the graph's input and output.
    height, width: the input side, or None where the graph leaves it symbolic.
    batch: a fixed batch size of the input, or None (symbolic).
    embedding_size: the output's last dimension, or None (symbolic).
    mean, std: the input is (pixels - mean) / std (insightface_reading).
    metadata: the graph's metadata_props (ours: architecture, width, ...).
  """
  input_name: str
  output_name: str
  height: int | None
  width: int | None
  batch: int | None
  embedding_size: int | None
  mean: float
  std: float
  metadata: dict


def _dims(value_info) -> list:
  return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
          for d in value_info.type.tensor_type.shape.dim]


def read_graph(path: str) -> tuple[Any, Graph]:
  """(the ONNX ModelProto, its Graph) of a recognition model file.

  Raises:
    UserError: naming the file: not an ONNX model, or not one input [N, 3, H, W] and one
      output [N, D] of float32.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  try:
    proto = onnx.load(path)
  except Exception as e:  # onnx raises DecodeError, OSError, ValueError ...
    raise UserError(f"--checkpoint={path}: not a readable ONNX model ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else e})") from e
  initializers = {t.name for t in proto.graph.initializer}
  inputs = [i for i in proto.graph.input if i.name not in initializers]
  expected = ("expected a face-recognition graph: one float32 input [N, 3, H, W] (RGB) and "
              "one float32 output [N, D], as insightface's recognition models")
  if len(inputs) != 1 or len(proto.graph.output) != 1:
    raise UserError(f"--checkpoint={path}: the graph has {len(inputs)} inputs and "
                    f"{len(proto.graph.output)} outputs; {expected}")
  (graph_input,), (graph_output,) = inputs, proto.graph.output
  shape_in, shape_out = _dims(graph_input), _dims(graph_output)
  floats = all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for v in (graph_input, graph_output))
  if len(shape_in) != 4 or shape_in[1] != 3 or len(shape_out) != 2 or not floats:
    raise UserError(f"--checkpoint={path}: input {graph_input.name} {shape_in} and output "
                    f"{graph_output.name} {shape_out}; {expected}")
  reading = insightface_reading(proto)
  graph = Graph(input_name=graph_input.name, output_name=graph_output.name,
                height=shape_in[2], width=shape_in[3], batch=shape_in[0],
                embedding_size=shape_out[1], mean=reading["input_mean"],
                std=reading["input_std"],
                metadata={p.key: p.value for p in proto.metadata_props})
  return proto, graph


class OnnxBackbone:
  """Runs a recognition graph with onnxruntime on the CPU: uint8 RGB images in, raw
  embeddings out (module docstring)."""

  def __init__(self, proto, graph: Graph, image_size: int, threads: int = 0):
    import onnxruntime  # pylint: disable=g-import-not-at-top
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    self.graph = graph
    self.image_size = int(image_size)
    self.session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                                sess_options=options,
                                                providers=["CPUExecutionProvider"])

  def _run(self, images: np.ndarray) -> np.ndarray:
    """Raw embeddings float32 [n, D] of uint8 RGB images [n, S, S, 3]."""
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    nchw = (nchw - np.float32(self.graph.mean)) / np.float32(self.graph.std)
    step = self.graph.batch or len(nchw)
    out = []
    for start in range(0, len(nchw), step):
      part = nchw[start:start + step]
      count = len(part)
      if count < step:  # a fixed batch: pad the last one
        part = np.concatenate([part, np.zeros((step - count,) + part.shape[1:], np.float32)])
      out.append(self.session.run([self.graph.output_name],
                                  {self.graph.input_name: part})[0][:count])
    return np.concatenate(out).astype(np.float32)

  def embed(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings, raw embeddings of the horizontal mirrors), float32 [N, D] each, of
    uint8 RGB images [N, S, S, 3] (S = image_size), batch_size images at a time.

    Raises:
      UserError: the images are not of the graph's input size.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise UserError(f"the ONNX model takes [N, {self.image_size}, {self.image_size}, 3] "
                      f"images, got {images.shape}")
    embeddings, flipped = [], []
    for start in range(0, len(images), max(1, int(batch_size))):
      part = images[start:start + batch_size]
      embeddings.append(self._run(part))
      flipped.append(self._run(part[:, :, ::-1]))
    if not embeddings:
      size = self.graph.embedding_size or 0
      return np.zeros((0, size), np.float32), np.zeros((0, size), np.float32)
    return np.concatenate(embeddings), np.concatenate(flipped)


def is_onnx_path(path: str) -> bool:
  return os.fspath(path).lower().endswith(SUFFIX)


def load_model(path: str, explicit):
  """A resolve.LoadedModel of an ONNX recognition model (format "onnx", module an
  OnnxBackbone, variables {}), with the settings its graph and metadata give.

  Args:
    path: the .onnx file.
    explicit: the caller's resolve.ArchSettings: only image_size applies, and only where
      the graph leaves its input size symbolic (else it must equal the graph's).

  Raises:
    command_line.FlagError: --arch, --width, --embedding_size or --use_se given, or an
      --image_size other than the graph's.
    UserError: not a readable recognition graph (`read_graph`), or a non-square input.
  """
  from mstkd_jax.interop import command_line, resolve  # pylint: disable=g-import-not-at-top
  proto, graph = read_graph(path)
  given = [f"--{f}" for f in ("arch", "width", "embedding_size", "use_se")
           if getattr(explicit, f) is not None]
  if given:
    raise command_line.FlagError(
        f"{', '.join(given)}: an ONNX model's architecture is its graph; drop them for "
        f"--checkpoint={path} (only --image_size applies, where the graph leaves its input "
        "size open)")
  if graph.height != graph.width and None not in (graph.height, graph.width):
    raise UserError(f"--checkpoint={path}: input {graph.height}x{graph.width}; expected a "
                    "square face input")
  side = graph.height or graph.width
  if side is not None and explicit.image_size not in (None, side):
    raise command_line.FlagError(f"--image_size={explicit.image_size}: the ONNX graph "
                                 f"{path} takes {side}x{side} images; drop --image_size")
  image_size = side or explicit.image_size or resolve.DEFAULTS.image_size
  meta = graph.metadata
  use_se = {"True": True, "False": False}.get(meta.get("use_se", ""))
  settings = resolve.ArchSettings(
      arch=meta.get("architecture") or "onnx graph",
      width=int(meta["width"]) if meta.get("width", "").isdigit() else None,
      embedding_size=graph.embedding_size, use_se=use_se, image_size=int(image_size))
  origins = {"arch": "onnx metadata" if meta.get("architecture") else "onnx graph",
             "image_size": ("onnx graph" if side else
                            "flag" if explicit.image_size else "default"),
             "embedding_size": "onnx graph"}
  return resolve.LoadedModel(module=OnnxBackbone(proto, graph, image_size), variables={},
                             settings=settings, origins=origins, format="onnx", path=path,
                             step=None, config=None,
                             name=os.path.splitext(os.path.basename(path))[0])
