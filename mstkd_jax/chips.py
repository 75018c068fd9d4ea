"""What the accelerators can do at most: dense peak FLOP/s (for MFU, in `bench` and `plan`),
for TPUs their memory and clock (for `plan`'s fit check and step-time estimate), and the
compile-only devices of a TPU topology that libtpu makes on a machine without TPUs."""

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile

from mstkd_jax.errors import UserError

INSTALL = "pip install -r requirements-tpu.txt (beside requirements.txt)"
_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+)x(\d+)(?:x(\d+))?$")


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation, per chip (what JAX sees as one device: v4 and v5p as megacore)."""
  name: str                  # "TPU v5e"
  topology_prefix: str       # the generation in libtpu's topology names: "v5e" in "v5e:2x4"
  kinds: tuple[str, ...]     # lower-case substrings of jax's device_kind, e.g. "tpu v5 lite"
  peak_tflops: float         # dense bfloat16 TFLOP/s
  hbm_bytes: int
  clock_hz: float | None     # the core clock the compiler's cycle counts run at; None: unknown


# Google Cloud's TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, /v5e,
# /v5p-training, /v6e; read 2026-12-06): peak bf16 compute and HBM per chip. v4's clock,
# 1050 MHz, is in the TPU v4 paper (Jouppi et al., ISCA 2023, Table 1). The pages give no
# clock for the others; v5e's and v5p's are their peak over the MXUs' multiply-adds per
# cycle as the pages count them (v5e: 4 MXUs of 128x128, 197e12 / (4 x 128^2 x 2) = 1.50
# GHz; v5p: 2 TensorCores x 4 MXUs, 1.75 GHz; the same rule gives v4's 1.05 GHz). v6e's
# page names 2 MXUs of 256x256, which by that rule would mean 3.5 GHz: not credible without
# a source, so its clock stays unknown and plan makes no time estimate for v6e. The pages'
# "GB" of HBM are GiB: the v5e compiler's limit, 15.48 GiB after its reserve, is more than
# 16e9 bytes.
TPU_CHIPS = (
    TpuChip("TPU v4", "v4", ("tpu v4",), 275.0, 32 << 30, 1.05e9),
    TpuChip("TPU v5e", "v5e", ("tpu v5 lite", "tpu v5e"), 197.0, 16 << 30, 1.5e9),
    TpuChip("TPU v5p", "v5p", ("tpu v5p", "tpu v5"), 459.0, 95 << 30, 1.75e9),
    TpuChip("TPU v6e", "v6e", ("tpu v6 lite", "tpu v6e"), 918.0, 32 << 30, None),
)

# Dense peak TFLOP/s per chip (no structured sparsity), by substrings of jax's device_kind,
# first match wins. "float32" is the rate XLA's default precision reaches with float32
# inputs: TF32 tensor cores on Ampere and later NVIDIA chips, bfloat16 passes on TPUs; a
# V100 has neither TF32 nor bfloat16 units, so both entries are its FP32 rate.
PEAK_TFLOPS = (
    (("h100 pcie",), "NVIDIA H100 PCIe", 756.0, 378.0),
    (("h100 nvl",), "NVIDIA H100 NVL", 835.0, 418.0),
    (("h100",), "NVIDIA H100 SXM", 989.0, 494.0),
    (("h200",), "NVIDIA H200", 989.0, 494.0),
    (("a100",), "NVIDIA A100", 312.0, 156.0),
    (("v100",), "NVIDIA V100", 15.7, 15.7),
    (("l4",), "NVIDIA L4", 121.0, 60.0),
) + tuple((c.kinds, c.name, c.peak_tflops, c.peak_tflops) for c in TPU_CHIPS)


def peak_tflops(device_kind: str, dtype: str) -> tuple[str | None, float | None]:
  """(chip name, dense peak TFLOP/s for `dtype`) of a jax device_kind; (None, None) if unknown."""
  kind = device_kind.lower()
  for patterns, name, bf16, fp32 in PEAK_TFLOPS:
    if any(p in kind for p in patterns):
      return name, bf16 if dtype == "bfloat16" else fp32
  return None, None


def tpu_chip(device_kind: str) -> TpuChip | None:
  """The TPU_CHIPS entry of a jax device_kind ("TPU v5 lite"), or None."""
  kind = device_kind.lower()
  return next((c for c in TPU_CHIPS if any(p in kind for p in c.kinds)), None)


@contextlib.contextmanager
def _quiet_stderr():
  """Keeps what libtpu's C++ code prints at start-up (its guesses about the absent TPU's
  host names) off stderr, where only our `error:` and `warning:` lines belong."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology(name: str):
  """(compile-only devices, TpuChip) of a libtpu topology name, e.g. "v5e:2x4" or
  "v4:2x2x1" (v4 as megacore, one device per chip, as a v4 VM runs JAX).

  Raises:
    UserError: libtpu is not installed, the name is not a topology of a known chip, libtpu
      refuses it, or another process holds libtpu's lock.
  """
  known = {c.topology_prefix: c for c in TPU_CHIPS}
  match = _TOPOLOGY.match(name)
  if not match or match.group(1) not in known:
    raise UserError(f"--topology={name!r}: expected <chip>:<X>x<Y>[x<Z>] with a chip of "
                    f"{sorted(known)}, e.g. v5e:2x4 or v4:2x2x1")
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"libtpu (the TPU compiler) is not installed; {INSTALL}")
  dims = [int(d) for d in match.groups()[1:] if d is not None]
  kwargs = {"chips_per_host_bounds": tuple(min(d, h) for d, h in zip(dims + [1] * (3 - len(
      dims)), (2, 2, 1)))}
  if match.group(1) == "v4":
    kwargs["chip_config_name"] = "megacore"
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    with _quiet_stderr():
      devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "lockfile" in text:
      raise UserError("another process is using libtpu (its lock file /tmp/libtpu_lockfile):"
                      " wait until it ends; on a machine without TPUs, "
                      "ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets this compile-only command run "
                      "beside it") from e
    raise UserError(f"--topology={name}: libtpu refused it: {text}") from e
  return devices, known[match.group(1)]
