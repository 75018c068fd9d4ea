"""`python -m mstkd_jax.plan`: the compiler's cycle estimate read from HLO text, the recipe's
size, the one-line errors, and (where libtpu is installed) the plan of a tiny recipe for a
one-chip topology, with a step that does not fit."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from configs import distill
from mstkd_jax import errors, hlo_cycles, recipe_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_LIBTPU = importlib.util.find_spec("libtpu") is None
needs_libtpu = pytest.mark.skipif(
    NO_LIBTPU, reason="libtpu is not installed (pip install -r requirements-tpu.txt, in a "
    "virtual environment of its own): the TPU compiler is what these tests run")

# An optimized TPU module as libtpu 0.0.42.1 prints it (compiled.as_text()), cut down: a
# convolution in the ENTRY computation, a while loop of 3 trips (counter from 0, i < 3,
# step 1) whose body holds a fused convolution, and a reduce after it.
LOOP_HLO = """HloModule jit_f, is_scheduled=true, entry_computation_layout={(bf16[8,14,14,64]{3,0,2,1:T(8,128)(2,1)})->bf16[8,14,14,64]{3,0,2,1:T(8,128)(2,1)}}

%fused_computation.1 (param_0.8: bf16[3,8,14,14,64], param_1.8: s32[]) -> bf16[3,8,14,14,64] {
  %param_0.8 = bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %dynamic_update_slice.4 = bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)} dynamic-update-slice(%param_0.8, %param_1.8), backend_config={"estimated_cycles":"999999"}
}

%wide.region_0.4.sunk (wide.arg_tuple.0: (s32[], bf16[3,8,14,14,64])) -> (s32[], bf16[3,8,14,14,64]) {
  %constant.16..sunk = s32[]{:T(128)} constant(1)
  %wide.arg_tuple.0 = (s32[]{:T(128)}, bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)}) parameter(0)
  %get-tuple-element.46 = s32[]{:T(128)} get-tuple-element(%wide.arg_tuple.0), index=0
  %copy.3 = s32[]{:T(128)S(6)} copy(%get-tuple-element.46), backend_config={"flag_configs":[],"scoped_memory_configs":[]}
  %add.2 = s32[]{:T(128)} add(%copy.3, %constant.16..sunk), metadata={op_name="jit(f)/while/body/add"}
  %get-tuple-element.47 = bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)} get-tuple-element(%wide.arg_tuple.0), index=1
  %fusion.2 = bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)} fusion(%get-tuple-element.47, %copy.3), kind=kOutput, calls=%fused_computation.1, backend_config={"flag_configs":[],"window_config":{"kernel_window_bounds":["3","3","64","1"],"estimated_cycles":"1000","iteration_bounds":["3","16","1","1"],"cost_model_type":"COST_MODEL_TYPE_CLASSIC"}}
  ROOT %tuple.11 = (s32[]{:T(128)}, bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)}) tuple(%add.2, %fusion.2)
}

%wide.region_1.5 (wide.arg_tuple.3: (s32[], bf16[3,8,14,14,64])) -> pred[] {
  %constant.18 = s32[]{:T(128)} constant(3)
  %wide.arg_tuple.3 = (s32[]{:T(128)}, bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)}) parameter(0)
  %get-tuple-element.20 = s32[]{:T(128)} get-tuple-element(%wide.arg_tuple.3), index=0
  ROOT %lt.0 = pred[]{:T(512)} compare(%get-tuple-element.20, %constant.18), direction=LT, metadata={op_name="jit(f)/while/cond/lt"}
}

ENTRY %main.7 (x.1: bf16[8,14,14,64]) -> bf16[8,14,14,64] {
  %constant.12 = s32[]{:T(128)} constant(0)
  %x.1 = bf16[8,14,14,64]{3,0,2,1:T(8,128)(2,1)} parameter(0), sharding={replicated}
  %fusion = bf16[8,14,14,64]{3,0,2,1:T(8,128)(2,1)} fusion(%x.1), kind=kOutput, calls=%fused_computation.1, backend_config={"flag_configs":[],"window_config":{"estimated_cycles":"500","cost_model_type":"COST_MODEL_TYPE_CLASSIC"}}
  %copy.8 = s32[]{:T(128)} copy(%constant.12), backend_config={"flag_configs":[]}
  %custom-call = bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)} custom-call(), custom_call_target="AllocateBuffer"
  %tuple.9 = (s32[]{:T(128)}, bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)}) tuple(%copy.8, %custom-call)
  %while = (s32[]{:T(128)}, bf16[3,8,14,14,64]{4,1,3,2,0:T(8,128)(2,1)S(1)}) while(%tuple.9), condition=%wide.region_1.5, body=%wide.region_0.4.sunk, metadata={op_name="jit(f)/while"}
  %psum.1 = f32[2,16]{1,0:T(2,128)S(1)} all-reduce(%fusion), channel_id=1, replica_groups={{0,1}}, to_apply=%wide.region_1.5
  ROOT %reduce = bf16[8,14,14,64]{3,0,2,1:T(8,128)(2,1)} reduce(%while, %constant.12), dimensions={0}, backend_config={"window_config":{"estimated_cycles":"20","cost_model_type":"COST_MODEL_TYPE_INVALID"}}
}
"""


def test_estimate_sums_the_scheduled_instructions_and_a_loop_body_per_trip():
  # 500 (ENTRY's fusion) + 3 trips x 1000 (the body's fusion) + 20 (the reduce); the fused
  # computation's own instructions (999999) belong to the fusions that call it.
  assert hlo_cycles.estimated_cycles(LOOP_HLO) == 500 + 3 * 1000 + 20


def test_estimate_takes_the_compilers_known_trip_count():
  text = LOOP_HLO.replace('metadata={op_name="jit(f)/while"}',
                          'backend_config={"known_trip_count":{"n":"7"}}')
  assert hlo_cycles.estimated_cycles(text) == 500 + 7 * 1000 + 20


@pytest.mark.parametrize("change", [
    ('"estimated_cycles"', '"cycles_estimate"'),     # the field renamed
    ("direction=LT", "direction=NE"),                # a loop bound it cannot read
    ("%copy.8 = s32[]{:T(128)} copy(%constant.12)",   # a counter starting from a variable
     "%copy.8 = s32[]{:T(128)} copy(%x.1)"),
    ("ENTRY %main.7", "%main.7"),                    # no ENTRY computation
    (" while(%tuple.9)", " conditional(%tuple.9)"),  # a branch taken at run time
])
def test_estimate_is_none_where_the_format_is_not_recognised(change):
  assert hlo_cycles.estimated_cycles(LOOP_HLO.replace(*change)) is None


def test_collectives_are_counted_with_their_bytes():
  assert hlo_cycles.collectives(LOOP_HLO) == {"count": 1, "bytes": 2 * 16 * 4}


def test_the_paper_recipe_is_a_billion_image_steps_86_percent_students():
  size = recipe_size.projection(distill.get_config("bupt_iresnet34"), {})
  by_step = size["by_step"]
  assert by_step["teacher"]["stages"] == 8
  assert by_step["student_cached"]["stages"] + by_step["student_alone"]["stages"] == 13
  # 8 teachers x 52 epochs x 325,000 images + 13 students x 52 epochs x 1.3M (batch 128).
  assert size["image_steps"] == pytest.approx(1.014e9, rel=1e-3)
  students = by_step["student_cached"]["image_steps"] + by_step["student_alone"]["image_steps"]
  assert students / size["image_steps"] == pytest.approx(0.867, abs=0.005)
  assert size["est_wall_s"] is None            # no step time given: no estimate


def test_projection_multiplies_steps_by_step_times():
  config = distill.get_config("smoke")
  seconds = {k: 0.5 for k in ("teacher", "extraction", "adaptor", "student_cached",
                              "student_alone")}
  size = recipe_size.projection(config, seconds)
  assert size["est_wall_s"] == pytest.approx(0.5 * sum(r["steps"] for r in size["stages"]))
  seconds["adaptor"] = None
  assert recipe_size.projection(config, seconds)["est_wall_s"] is None


def _plan(*args, hide_libtpu=False, timeout=900):
  """Runs the plan command in a child process: (return code, stdout, stderr)."""
  script = ("import sys\n" + ("sys.modules['libtpu'] = None\n" if hide_libtpu else "")
            + "from mstkd_jax import plan\nsys.argv = ['plan'] + sys.argv[1:]\nplan.cli()\n")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  # libtpu admits one process at a time unless told otherwise; these only compile.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  done = subprocess.run([sys.executable, "-c", script] + list(args), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  return done.returncode, done.stdout, done.stderr


def _error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
  return lines[0]


def test_without_libtpu_it_says_how_to_install_it_in_one_line():
  code, _, stderr = _plan("--config=configs/distill.py:smoke", "--topology=v5e:1x1",
                          hide_libtpu=True)
  assert code == 1
  assert "requirements-tpu.txt" in _error_line(stderr)


def test_the_readmes_plan_command_is_accepted_as_written():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index("```bash", text.index("## Before renting a TPU")) + len("```bash")
  block = text[start:text.index("```", start)].replace("\\\n", " ")
  (command,) = [shlex.split(line) for line in block.splitlines() if "mstkd_jax.plan" in line]
  args = command[command.index("mstkd_jax.plan") + 1:]
  # Every flag, the config and the topology read; then the missing libtpu stops it.
  code, _, stderr = _plan(*args, hide_libtpu=True)
  assert code == 1 and "requirements-tpu.txt" in _error_line(stderr)


def test_an_unknown_topology_is_one_error_line():
  code, _, stderr = _plan("--config=configs/distill.py:smoke", "--topology=v9z:2x2")
  assert code == 1 and "v5e:2x4" in _error_line(stderr)


def test_a_config_that_is_not_a_recipe_is_one_error_line():
  code, _, stderr = _plan("--config=configs/teacher.py", "--topology=v5e:1x1")
  assert code == 1 and "configs/distill.py" in _error_line(stderr)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  # dtype "auto": what a run on the chip would use (bfloat16), not this CPU's float32.
  code, stdout, stderr = _plan("--config=configs/distill.py:smoke", "--topology=v5e:1x1",
                               "--config.teacher.model.dtype=auto",
                               "--config.student.model.dtype=auto", f"--json={out}")
  assert code == 0, stderr[-3000:]
  with open(out) as f:
    return json.load(f), stdout, stderr


@needs_libtpu
def test_plan_compiles_every_step_of_a_tiny_recipe_for_one_chip(tiny_plan):
  plan, stdout, stderr = tiny_plan
  assert plan["topology"] == "v5e:1x1" and plan["chip"] == "TPU v5e" and plan["chips"] == 1
  steps = {s["step"]: s for s in plan["steps"]}
  assert list(steps) == ["teacher", "extraction", "adaptor", "student_cached",
                         "student_online"]
  for name, step in steps.items():
    assert step["dtype"] == "bfloat16", name
    assert step["flops"] > 0 and step["peak_bytes"] > 0 and step["fits"] is True, name
    assert step["hbm_bytes"] == 16 << 30 and step["est_step_s"] > 0, name
    assert 0 < step["est_mfu"] <= 1 and step["est_img_per_s"] > 0, name
  # The online step adds G = 2 teacher forwards to the cached one.
  assert steps["student_online"]["flops"] > steps["student_cached"]["flops"]
  recipe = plan["recipe"]
  assert recipe["image_steps"] == recipe_size.projection(
      distill.get_config("smoke"), {})["image_steps"]
  assert recipe["est_wall_s"] > 0
  assert "est. MFU" in stdout and "projected wall time" in stdout and "left out" in stdout
  assert not [line for line in stderr.splitlines() if not line.startswith("[plan]")], stderr


@needs_libtpu
def test_a_batch_too_large_for_the_chip_does_not_fit(tmp_path):
  out = tmp_path / "plan.json"
  code, stdout, _ = _plan("--config=configs/distill.py:smoke", "--topology=v5e:1x1",
                          "--only=extraction", "--config.teacher.train.eval_batch_size=4194304",
                          f"--json={out}")
  assert code == 0
  with open(out) as f:
    (step,) = json.load(f)["steps"]
  assert step["fits"] is False and step["peak_bytes"] > step["hbm_bytes"]
  assert step["est_step_s"] is None and step["est_mfu"] is None    # null, never a guess
  (warning,) = [line for line in stdout.splitlines() if line.startswith("warning:")]
  assert "does not fit" in warning and "teacher.train.eval_batch_size" in warning


_CONV = """
import re, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mstkd_jax import chips, hlo_cycles
devices, chip = chips.topology("v5e:1x1")
replicated = NamedSharding(Mesh(np.asarray(devices), ("batch",)), P())
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
x = jax.ShapeDtypeStruct((128, 14, 14, 512), jnp.bfloat16, sharding=replicated)
w = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.bfloat16, sharding=replicated)
compiled = jax.jit(conv).lower(x, w).compile()
seconds = hlo_cycles.estimated_cycles(compiled.as_text()) / chip.clock_hz
print(compiled.cost_analysis()["flops"] / seconds / (chip.peak_tflops * 1e12))
"""


@needs_libtpu
def test_a_3x3_512_channel_convolution_is_estimated_near_the_mxu_peak():
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", _CONV], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  # 88.6% with libtpu 0.0.42.1 at v5e's 1.5 GHz.
  assert 0.6 < float(done.stdout.split()[-1]) <= 1.0


def test_a_tpu_compilers_out_of_memory_error_reads_in_a_few_words():
  error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                       "required for HLO temporaries (93.50G) exceeds available HBM (15.75G).")
  assert errors.out_of_memory(error) == ("it needs 93.5 GiB of HBM where the device has "
                                         "15.8 GiB")
  # The plan's peak for a step that does not fit: the needed figure, in bytes.
  assert errors.needed_bytes(error) == int(93.50 * 2**30)
  assert errors.needed_bytes(RuntimeError(
      "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.29G of 15.48G "
      "hbm.")) == int(20.29 * 2**30)
  assert errors.needed_bytes(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                          "1099511627776 bytes.")) is None
