"""The benchmark runs without TensorFlow and reports img/s, cost ratios and MFU as JSON."""

import json
import os
import subprocess
import sys

import pytest

import conftest
from mstkd_jax import bench, recipe_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import tensorflow` (and TFDS, clu) fail in the child, as on a machine without them.
_NO_TENSORFLOW = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
  sys.modules[name] = None
from mstkd_jax import bench, recipe_steps
sys.argv = ["bench"] + sys.argv[1:]
bench.cli()
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  env = dict(os.environ)
  # One CPU device (conftest simulates 8), and XLA's quick code generation: this checks the
  # plumbing, not the speed, and compiling dominates the child's time.
  env["XLA_FLAGS"] = conftest.child_xla_flags("--xla_backend_optimization_level=0")
  # online_kd_vmap (a diagnostic variant) is left out to keep the compilations few.
  args = ["--config=configs/distill.py:smoke", "--stage_depths=1,1,1,1", "--batch=8",
          "--image_size=16", "--num_classes=8", "--num_teachers=2", "--steps=2",
          "--warmup=1", "--rounds=1", "--torch", f"--out={out}",
          "--only=cached_kd,online_kd,extraction,adaptor,pipeline"]
  done = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out) as f:
    return json.load(f), done.stdout


def test_runs_without_tensorflow_and_writes_every_measurement(report):
  data, _ = report
  assert set(data) >= {"setup", "device", "results", "date"}
  assert list(data["results"]) == ["plain", "cached_kd", "online_kd", "extraction",
                                   "adaptor", "pipeline", "torch"]
  assert data["results"]["pipeline"] == {"skipped": "TensorFlow is not installed"}
  assert data["setup"]["batch"] == 8 and data["setup"]["stage_depths"] == [1, 1, 1, 1]


def test_ratios_throughputs_and_flops_are_positive(report):
  data, _ = report
  timed = {k: v for k, v in data["results"].items() if "skipped" not in v}
  assert {"plain", "cached_kd", "online_kd", "extraction", "adaptor"} <= set(timed)
  for name, entry in timed.items():
    assert entry["img_per_s"] > 0 and entry["seconds_per_step"] > 0, name
    assert entry["cost_vs_plain"] > 0, name
  assert timed["plain"]["cost_vs_plain"] == pytest.approx(1.0)
  for name in ("plain", "cached_kd", "online_kd"):
    assert timed[name]["finite_loss"], name
    assert timed[name]["flops_per_device"] > 0, name
  # The G = 2 teacher forwards add about what extraction (2 forwards of one teacher) costs.
  added = timed["online_kd"]["flops_per_device"] - timed["cached_kd"]["flops_per_device"]
  assert added == pytest.approx(timed["extraction"]["flops_per_device"], rel=0.1)
  assert timed["cached_kd"]["goal"] == "<= 1.1" and "goal_met" in timed["cached_kd"]
  assert data["device"]["platform"] == "cpu" and timed["plain"]["mfu"] is None


def test_prints_a_table_with_every_measurement(report):
  _, stdout = report
  for name in ("plain", "cached_kd", "online_kd", "extraction", "adaptor", "pipeline"):
    assert name in stdout
  assert "cost x plain" in stdout and "MFU" in stdout


@pytest.mark.parametrize("kind,dtype,chip,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", "NVIDIA H100 SXM", 989.0),
    ("NVIDIA H100 80GB HBM3", "float32", "NVIDIA H100 SXM", 494.0),
    ("NVIDIA H200", "bfloat16", "NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", "NVIDIA A100", 312.0),
    ("TPU v5 lite", "bfloat16", "TPU v5e", 197.0),
    ("TPU v5p", "bfloat16", "TPU v5p", 459.0),
    ("cpu", "float32", None, None),
])
def test_peak_table_matches_device_kinds(kind, dtype, chip, tflops):
  assert bench.peak_tflops(kind, dtype) == (chip, tflops)


def test_mfu_uses_the_peak_and_goals_read_the_cost_ratio():
  results = {"plain": {"img_per_s": 100.0, "seconds_per_step": 1.0, "flops_per_device": 2e12},
             "cached_kd": {"img_per_s": 80.0, "seconds_per_step": 1.25,
                           "flops_per_device": 2e12}}
  bench._add_ratios(results, peak=4.0)  # pylint: disable=protected-access
  assert results["plain"]["mfu"] == pytest.approx(0.5)
  assert results["cached_kd"]["cost_vs_plain"] == pytest.approx(1.25)
  assert results["cached_kd"]["goal_met"] is False


def test_head_scale_measures_memory_per_device_and_runs_each_layout(capsys):
  """--head_scale on the 8 simulated devices, tiny: 1,000 identities at D = 64."""
  from mstkd_jax import bench_heads, losses  # pylint: disable=g-import-not-at-top
  report = bench_heads.run([1000], margin=losses.MarginSpec(), embedding_size=64, batch=16,
                           steps=1)
  cases = {c["layout"]: c for c in report["cases"]}
  assert list(cases) == ["replicated", "sharded", "sampled"]
  assert cases["sharded"]["classes_per_device"] == 125
  for case in cases.values():
    assert case["finite_loss"] and case["seconds_per_step"] > 0, case
  # The centres and their momentum dominate: split 8 ways, about 1/8 per device.
  state_bytes = 2 * 4 * 64 * 1000
  assert cases["replicated"]["arguments_bytes"] >= state_bytes
  assert cases["sharded"]["arguments_bytes"] < state_bytes / 8 * 1.1
  assert report["ratios"]["1000/sharded"]["memory"] < 0.2
  assert report["ratios"]["1000/replicated"] == {"memory": 1.0, "time": 1.0}
  print(bench_heads.format_table(report))
  assert "x repl" in capsys.readouterr().out


def test_head_scale_skips_running_what_would_not_fit():
  from mstkd_jax import bench_heads, losses  # pylint: disable=g-import-not-at-top
  report = bench_heads.run([1000], margin=losses.MarginSpec(), embedding_size=64, batch=16,
                           steps=1, run_limit_gib=1e-6, layouts=("replicated",))
  (case,) = report["cases"]
  assert case["skipped"].startswith("not run") and case["total_bytes"] > 0
  assert "seconds_per_step" not in case


class _Analysed:
  """A lowered or compiled stand-in whose cost analysis counts `flops`."""

  def __init__(self, flops):
    self.flops = flops

  def cost_analysis(self):
    return {"flops": self.flops} if self.flops is not None else None


def test_flops_cross_check_prefers_the_lowered_count_when_the_compiled_one_undercounts(
    capsys):
  # As XLA:GPU's analysis does where convolutions become library calls.
  flops = recipe_steps.checked_flops(_Analysed(2e9), _Analysed(7e9), "plain")
  assert flops == 7e9
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith("warning: plain:") and "2e+09" in line and "7e+09" in line


def test_flops_cross_check_keeps_the_compiled_count_within_10_percent(capsys):
  assert recipe_steps.checked_flops(_Analysed(1.05e9), _Analysed(1e9), "plain") == 1.05e9
  assert recipe_steps.checked_flops(_Analysed(3e9), _Analysed(None), "plain") == 3e9
  assert capsys.readouterr().out == ""


def test_flops_cross_check_falls_back_to_the_lowered_count(capsys):
  assert recipe_steps.checked_flops(_Analysed(-1.0), _Analysed(5e9), "plain") == 5e9
  assert "gives no FLOP count" in capsys.readouterr().out
