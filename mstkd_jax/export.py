r"""Exports a trained backbone to ONNX, as insightface's recognition models are shipped.

  python -m mstkd_jax.export --checkpoint=workdir/distill_default/student/mstkd/SL/a-KD \
      --out=student.onnx
  python -m mstkd_jax.export --checkpoint=r34.pth --arch=iresnet34 --out=r34.onnx [--benchmark]

--checkpoint and the model flags (--arch, --width, --embedding_size, --use_se,
--image_size) are resolved exactly as `mstkd_jax.evaluate` resolves them
(mstkd_jax.interop.resolve): an Orbax stage workdir, model/ or checkpoints/ folder or step
folder of this project, or a PyTorch IResNet state_dict (.pth).

The graph (insightface's recognition-model convention, what its model_zoo loads):
  input "input": float32 [N, 3, H, W], N dynamic, H = W = the model's input size; RGB,
    normalized (x - 127.5) / 127.5 from uint8 pixels. That is evaluate's (x / 255 - 0.5) /
    0.5: the Flax model (NHWC) is fed the input transposed.
  output "embedding": float32 [N, D], the raw embedding (not L2-normalized).
  BatchNorm with its running statistics (inference mode), dropout off; ONNX opset --opset
  (default 18; 13 or newer). The SE variant needs 18 or newer: below it the converter
  writes an opset-18 ReduceMean, which the ONNX checker refuses (one line says so).
  metadata_props: architecture, width, embedding_size, use_se, image_size, input and output
  conventions, source checkpoint and its format, step, where each setting came from, the
  converter and JAX versions, the git revision of mstkd_jax (when it runs from a checkout)
  and the measured max relative error against JAX.

Converter: jax2onnx, which lowers the jaxpr of the jitted function primitive by primitive.
Measured on 2026-11-30 (JAX 0.10.2, onnxruntime 1.32, CPU): jax2onnx 0.17.1 gave our JAX
embeddings within a max relative error of 1.4e-6 (IResNet-18 width 8, 112x112) and
4.5e-6 to 5.7e-6 (IResNet-34 width 64, 112x112), and insightface's loader within a cosine
of 0.99999994. jax2tf + tf2onnx 1.17 could not convert the model at all:
jax2tf in current JAX only serializes natively (one TF XlaCallModule op holding StableHLO;
its graph-based mode was removed), and tf2onnx has no conversion for XlaCallModule, so no
error figure exists for it.

Every export is checked before it is written: onnxruntime (CPU) runs the graph on a fixed
batch of random images, and it must agree with the JAX model within MAX_RELATIVE_ERROR
(max |onnx - jax| / max |jax|); the figure is printed and stored in the metadata.

insightface 0.7.3 (`insightface.model_zoo.get_model(path)`) returns an ArcFaceONNX for a
square input of at least 112, a multiple of 16, other than 192 (its landmark model's
size); otherwise (e.g. the synthetic set's 32x32 models) it returns None, and
`insightface.model_zoo.arcface_onnx.ArcFaceONNX(model_file=path)` loads the graph directly
(the export warns). ArcFaceONNX normalizes its input itself, (x - 127.5) / 127.5 from BGR
uint8 with a channel swap to RGB (cv2.dnn.blobFromImages), unless one of the graph's first
8 node names starts with Sub/_minus and one with Mul/_mul (then it feeds raw pixels); the
export checks that its graph is read the first way, which is our normalization.

--dtype=float16 is not offered: the model would compute in float16 (our models are
trained and evaluated in float32), so the float32 fidelity check above could not hold.

--benchmark then times onnxruntime (CPU, this machine's threads) on the written graph
against the same model's jitted JAX forward pass, on the same batch, and prints img/s.

In Python: `export(checkpoint, arch_settings, out)` returns a summary dict. Errors a user
can fix print one `error: ...` line and exit 2 (flags) or 1 (checkpoint, converter).
"""

import dataclasses
import json
import logging as py_logging
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

from mstkd_jax import errors
from mstkd_jax.errors import UserError
from mstkd_jax.interop import command_line, resolve
# How insightface's model_zoo reads a graph; shared with evaluate's ONNX checkpoints.
from mstkd_jax.interop.onnx_model import INSIGHTFACE_MIN_SIZE, INSIGHTFACE_OTHER_SIZES
from mstkd_jax.interop.onnx_model import insightface_reading
from mstkd_jax.interop.command_line import FlagError

DEFAULT_OPSET = 18
MIN_OPSET = 13
MAX_RELATIVE_ERROR = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
NORMALIZATION = "(x - 127.5) / 127.5 of RGB uint8 pixels, NCHW"
# Images of the fidelity check: a fixed random batch.
CHECK_IMAGES = 4


# --- The graph -------------------------------------------------------------------------


def graph_function(module, variables) -> Callable:
  """The function the ONNX graph computes: float32 NCHW [N, 3, H, W] (normalized RGB) ->
  the raw embedding float32 [N, D]; BatchNorm in inference mode, `variables` baked in."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def embed_nchw(images):
    return module.apply(variables, jnp.transpose(images, (0, 2, 3, 1)), train=False)
  return embed_nchw


def convert(fn: Callable, image_size: int, opset: int = DEFAULT_OPSET,
            model_name: str = "mstkd_jax"):
  """jax2onnx's ONNX ModelProto of `fn`, a function of float32 [N, 3, S, S] (N dynamic).

  The converter's intermediate value_info (shape annotations of inner values) is dropped:
  jax2onnx 0.17 annotates some transposed values with their NHWC shapes, which
  onnxruntime reports as warnings when loading; the graph's inputs and outputs keep
  theirs, and runtimes infer the rest.

  Raises:
    UserError: the converter has no ONNX form for an operation of `fn` (named when the
      converter names it), or its graph is not valid ONNX at `opset` (ONNX checker).
  """
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  # onnx_ir warns about every value whose type it leaves to inference.
  py_logging.getLogger("onnx_ir").setLevel(py_logging.ERROR)
  try:
    proto = jax2onnx.to_onnx(fn, inputs=[("N", 3, image_size, image_size)],
                             model_name=model_name, opset=opset, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  except NotImplementedError as e:
    found = re.search(r"primitive '([^']+)'", str(e))
    what = f"the JAX operation {found.group(1)!r}" if found else "an operation"
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"the converter (jax2onnx {_version('jax2onnx')}) cannot express {what} "
                    f"of the model in ONNX ({detail})") from e
  del proto.graph.value_info[:]
  try:
    onnx.checker.check_model(proto, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"the converter's graph is not valid ONNX at opset {opset} ({first}); "
                    f"try --opset={max(opset + 1, DEFAULT_OPSET)} or newer") from e
  return proto


def max_relative_error(values, reference) -> float:
  """max |values - reference| / max |reference| (float64)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(values - reference).max() / max(np.abs(reference).max(), 1e-30))


def check_images(image_size: int, count: int = CHECK_IMAGES, seed: int = 0):
  """A fixed batch of random uint8 RGB images [count, S, S, 3] and the graph's input for
  them, float32 [count, 3, S, S] normalized (x - 127.5) / 127.5."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(seed).integers(0, 256, (count, image_size, image_size, 3),
                                                dtype=np.uint8)
  return images, normalized_nchw(images)


def normalized_nchw(images):
  """uint8 RGB [N, H, W, 3] -> float32 [N, 3, H, W], (x - 127.5) / 127.5."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.ascontiguousarray(
      ((np.asarray(images, np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2))


def onnx_session(model, threads: int = 0):
  """An onnxruntime CPU InferenceSession of a ModelProto, serialized bytes or a path;
  `threads` intra-op threads (0: onnxruntime's default, the machine's cores)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only
  options.intra_op_num_threads = threads
  if hasattr(model, "SerializeToString"):
    model = model.SerializeToString()
  return onnxruntime.InferenceSession(model, sess_options=options,
                                      providers=["CPUExecutionProvider"])


def jax_embeddings(module, variables, images_nchw):
  """The JAX model's raw embeddings float32 [N, D] of a normalized NCHW batch, computed on
  the CPU in full float32 (an accelerator's default TF32 convolutions would differ from
  onnxruntime's by more than the check allows)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  cpu = jax.devices("cpu")[0]
  nhwc = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
  with jax.default_device(cpu), jax.default_matmul_precision("highest"):
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    return np.asarray(apply(jax.device_put(variables, cpu), jax.device_put(nhwc, cpu)))


# --- Export ----------------------------------------------------------------------------


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"


def _git_revision() -> str | None:
  """The commit of the mstkd_jax checkout this runs from (+"-dirty"), or None."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return head.strip() + ("-dirty" if dirty.strip() else "") if head.strip() else None


def metadata(model: resolve.LoadedModel, error: float) -> dict:
  """The ONNX metadata_props of an export: {key: str}."""
  import jax  # pylint: disable=g-import-not-at-top
  settings = model.settings
  props = {
      "framework": "mstkd_jax",
      "architecture": str(settings.arch), "width": str(settings.width),
      "embedding_size": str(settings.embedding_size), "use_se": str(bool(settings.use_se)),
      "image_size": str(settings.image_size),
      "input": f"{INPUT_NAME}: float32 [N, 3, {settings.image_size}, {settings.image_size}], "
               + NORMALIZATION,
      "output": f"{OUTPUT_NAME}: float32 [N, {settings.embedding_size}], the raw embedding "
                "(L2-normalize it before comparing; insightface: image + mirror summed first)",
      "source_checkpoint": model.path, "checkpoint_format": model.format,
      "model_settings_from": json.dumps(model.origins, sort_keys=True),
      "converter": f"jax2onnx {_version('jax2onnx')}", "jax_version": jax.__version__,
      "max_relative_error_vs_jax": f"{error:.3g}",
  }
  if model.step is not None:
    props["step"] = str(model.step)
  revision = _git_revision()
  if revision:
    props["mstkd_jax_revision"] = revision
  return props


def export(checkpoint: Any, arch_settings: Any, out: Any, *, opset: int = DEFAULT_OPSET,
           verbose: bool = True) -> dict:
  """Converts a checkpoint's backbone to an ONNX file (see the module docstring).

  Args:
    checkpoint: an Orbax stage workdir, model/ or checkpoints/ folder or step folder; or a
      PyTorch IResNet state_dict file (.pth).
    arch_settings: an ArchSettings or a dict of its fields; None fields (or None) come from
      the workdir's config.json, the checkpoint's shapes, or DEFAULTS.
    out: the .onnx file to write (atomically; its folder is created).
    opset: the ONNX opset, MIN_OPSET or newer.
    verbose: print warnings (stderr) and the summary line (stdout).

  Returns:
    {"path", "settings" (ArchSettings fields), "opset", "max_relative_error" (onnxruntime
    against JAX on CHECK_IMAGES random images), "insightface" (`insightface_reading`),
    "metadata" (the metadata_props written), "warnings"}.

  Raises:
    FlagError: a bad setting (architecture, sizes, opset, --out).
    UserError: the checkpoint is missing or not a backbone, the converter cannot express
      the model, or onnxruntime disagrees with JAX by more than MAX_RELATIVE_ERROR.
      Nothing is written then.
  """
  explicit = resolve.as_settings(arch_settings, FlagError)
  resolve.check_settings(explicit, "--", FlagError)
  if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
    raise FlagError(f"--opset={opset!r}: expected an ONNX opset of {MIN_OPSET} or newer")
  path = command_line.output_file(out, "model.onnx")
  checkpoint_path = command_line.checkpoint_path(checkpoint)
  model = resolve.load_model(checkpoint_path, explicit)
  if model.format == "onnx":
    raise FlagError(f"--checkpoint={checkpoint_path}: is an ONNX model already; export "
                    "takes an Orbax checkpoint or a PyTorch .pth")
  size = int(model.settings.image_size)
  proto = convert(graph_function(model.module, model.variables), size, opset,
                  model_name=f"mstkd_jax_{model.settings.arch}")
  _, inputs = check_images(size)
  onnx_out = onnx_session(proto).run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
  error = max_relative_error(onnx_out, jax_embeddings(model.module, model.variables, inputs))
  if not error <= MAX_RELATIVE_ERROR:
    raise UserError(f"{checkpoint_path}: the converted graph disagrees with the JAX model "
                    f"(max relative error {error:.3g} > {MAX_RELATIVE_ERROR:g} under "
                    f"onnxruntime {_version('onnxruntime')}); nothing written")
  warnings = []
  reading = insightface_reading(proto)
  if (reading["input_mean"], reading["input_std"]) != (127.5, 127.5):
    raise UserError("insightface would read the converted graph as normalizing its input "
                    "itself (a Sub and a Mul among its first 8 node names); nothing written")
  if not reading["routed"]:
    why = (f"it takes {size}x{size} for {INSIGHTFACE_OTHER_SIZES[size]}"
           if size in INSIGHTFACE_OTHER_SIZES else
           f"it returns None below {INSIGHTFACE_MIN_SIZE}x{INSIGHTFACE_MIN_SIZE}")
    warnings.append(
        f"insightface.model_zoo.get_model will not load this {size}x{size} model as a "
        f"recognition model ({why}); load it with insightface.model_zoo.arcface_onnx."
        "ArcFaceONNX(model_file=...) or onnxruntime directly")
  props = metadata(model, error)
  import onnx  # pylint: disable=g-import-not-at-top
  from mstkd_jax import files  # pylint: disable=g-import-not-at-top
  onnx.helper.set_model_props(proto, props)
  proto.doc_string = (f"{model.settings.arch} face-embedding backbone exported by mstkd_jax "
                      f"from {model.path}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_path(path, suffix=".onnx") as tmp:
    onnx.save(proto, tmp)
  summary = {"path": path, "settings": dataclasses.asdict(model.settings), "opset": opset,
             "max_relative_error": error, "insightface": reading, "metadata": props,
             "warnings": warnings}
  if verbose:
    errors.warn_all(warnings, sys.stderr)
    print(f"Wrote {path} ({resolve.describe(model.settings)}, opset {opset}, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB): input {INPUT_NAME} float32 "
          f"[N, 3, {size}, {size}], output {OUTPUT_NAME} float32 "
          f"[N, {model.settings.embedding_size}]; onnxruntime vs JAX max relative error "
          f"{error:.2g}", flush=True)
  return summary


# --- Speed -----------------------------------------------------------------------------


def _images_per_second(run: Callable[[], Any], batch: int, min_seconds: float) -> float:
  count, start = 0, time.perf_counter()
  while True:
    run()
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds and count >= 3:
      return batch * count / elapsed


def benchmark(onnx_path: str, module, variables, image_size: int, batch: int = 64,
              min_seconds: float = 2.0, rounds: int = 3) -> dict:
  """img/s of onnxruntime (CPU, default threads) on `onnx_path` and of the jitted JAX
  forward pass (train=False, one device) on one random batch of `batch` images.

  After a warm-up run of each (compilation, allocation), the two are timed in `rounds`
  alternating rounds of at least `min_seconds` each, and each one's fastest round counts,
  so that load from other processes weighs on both alike. Returns {"onnxruntime", "jax"
  (img/s), "batch", "image_size", "jax_device" (JAX's platform)}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  session = onnx_session(onnx_path)
  _, inputs = check_images(image_size, batch, seed=1)
  nhwc = jax.device_put(inputs.transpose(0, 2, 3, 1))
  device_vars = jax.device_put(variables)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  runs = {"onnxruntime": lambda: session.run([OUTPUT_NAME], {INPUT_NAME: inputs}),
          "jax": lambda: apply(device_vars, nhwc).block_until_ready()}
  rates = {name: 0.0 for name in runs}
  for run in runs.values():
    run()
  for _ in range(rounds):
    for name, run in runs.items():
      rates[name] = max(rates[name], _images_per_second(run, batch, min_seconds))
  return {**rates, "batch": batch, "image_size": image_size,
          "jax_device": jax.devices()[0].platform}


# --- Command line ----------------------------------------------------------------------


def define_flags() -> dict:
  """Defines the command's absl flags (only when run as a command, so that importing this
  module next to mstkd_jax.evaluate defines no flag twice); returns their holders."""
  return {
      # --checkpoint, --arch, --width, --embedding_size, --use_se, --image_size (as evaluate).
      "model": command_line.define_model_flags(),
      "out": flags.DEFINE_string("out", None, "The .onnx file to write."),
      "opset": flags.DEFINE_integer("opset", DEFAULT_OPSET,
                                    f"ONNX opset ({MIN_OPSET} or newer)."),
      "benchmark": flags.DEFINE_boolean(
          "benchmark", False, "After exporting, time onnxruntime against the JAX forward pass "
          "on this machine (img/s)."),
      "benchmark_batch": flags.DEFINE_integer("benchmark_batch", 64,
                                              "Images per timed batch."),
  }


def run(holders: dict) -> None:
  """The command: export, then with --benchmark time it (prints one line each)."""
  model_flags, benchmark_on = holders["model"], holders["benchmark"].value
  if benchmark_on:
    resolve.check_positive(holders["benchmark_batch"].value, "--benchmark_batch", FlagError)
  summary = export(model_flags.checkpoint.value, model_flags.settings(),
                   holders["out"].value, opset=holders["opset"].value)
  if benchmark_on:
    model = resolve.load_model(command_line.checkpoint_path(model_flags.checkpoint.value),
                               model_flags.settings())
    rates = benchmark(summary["path"], model.module, model.variables,
                      int(model.settings.image_size), holders["benchmark_batch"].value)
    print(f"Speed on this machine ({os.cpu_count()} CPUs, batch {rates['batch']} of "
          f"{rates['image_size']}x{rates['image_size']}): onnxruntime "
          f"{rates['onnxruntime']:.1f} img/s (CPU), JAX {rates['jax']:.1f} img/s "
          f"({rates['jax_device'].upper()}) "
          f"(onnxruntime / JAX {rates['onnxruntime'] / rates['jax']:.2f}x)", flush=True)


if __name__ == "__main__":
  _HOLDERS = define_flags()
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(lambda argv: command_line.run_command(argv, lambda: run(_HOLDERS)),
          flags_parser=command_line.parse_flags)
