"""The standalone evaluation command: checkpoints (Orbax, .pth), data (.bin, RFW, synthetic),
the report it writes, and the one-line errors of bad inputs.

One tiny IResNet (iresnet18, width 4, embedding 16, 16x16 input) is used everywhere, so the
embedding function compiles once for the whole file.
"""

import ast
import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from mstkd_jax import evaluate as evaluate_lib
from mstkd_jax import models
from mstkd_jax import workdir as workdir_lib
from mstkd_jax.data import pairs, sources, synthetic
from mstkd_jax.formats import rfw, verification_bin
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding
from mstkd_jax.interop import orbax_checkpoint, resolve, torch_checkpoint
from mstkd_jax.train import build, checkpoints, parallel as parallel_lib, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"arch": "iresnet18", "width": 4, "embedding_size": 16, "image_size": 16}
SPEC = synthetic.SyntheticSpec(num_groups=2, identities_per_group=2, images_per_identity=1,
                               eval_identities_per_group=6, eval_images_per_identity=4,
                               pairs_per_group=40, image_size=16)
BATCH = 64
REPORT_FILES = {"report.json", "report.md", "roc.json", "accuracy_by_group.png"}


def _batch_norms(tree):
  if "mean" in tree:
    return [tree]
  return [bn for value in tree.values() for bn in _batch_norms(value)]


def _random_variables():
  module = models.create("iresnet18", width=4, embedding_size=16)
  variables = build.init_variables(module, jax.random.PRNGKey(0),
                                   np.zeros((1, 16, 16, 3), np.float32), train=False)
  # Non-trivial BatchNorm statistics, so that their conversion is checked too.
  rng = np.random.default_rng(0)
  for stats in _batch_norms(variables["batch_stats"]):
    stats["mean"] = rng.normal(0.0, 0.05, stats["mean"].shape).astype(np.float32)
    stats["var"] = rng.uniform(0.5, 1.5, stats["var"].shape).astype(np.float32)
  # A random net's embeddings are nearly constant; centring and scaling them with the
  # embedding BatchNorm (as training would) makes the accuracies differ from 50%. This
  # also compiles the embedding function that every evaluation below reuses.
  faces = synthetic.generate(SPEC)
  images = np.concatenate([faces.eval_images[g] for g in SPEC.group_names])
  out, _ = embedding.embed_images(variables, module, images, parallel_lib.get("pmap", 0), BATCH)
  stats, bias = variables["batch_stats"]["features"], variables["params"]["features"]["bias"]
  raw = (out - bias) * np.sqrt(stats["var"] + 1e-5) + stats["mean"]
  stats["mean"], stats["var"] = raw.mean(0), raw.var(0)
  return variables


def _save_orbax(directory, step, variables):
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(lambda s: 0.1, 5.0),
                      "head": state_lib.ParamGroup(lambda s: 0.1)})
  head = {"kernel": np.random.default_rng(step).normal(size=(16, 10)).astype(np.float32)}
  state = state_lib.create_state({"backbone": variables["params"], "head": head},
                                 variables["batch_stats"], tx)
  manager = checkpoints.Checkpoints(directory)
  manager.save(step, jax.tree.map(np.asarray, state))
  manager.wait()
  manager.close()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
  """A stage workdir (Orbax steps 3 and 7, config.json) and a .pth of the step-7 weights."""
  root = tmp_path_factory.mktemp("models")
  variables = _random_variables()
  workdir = root / "teacher_run"
  older = jax.tree.map(lambda x: x * 0.5, variables)
  _save_orbax(str(workdir / "checkpoints"), 3, older)
  _save_orbax(str(workdir / "checkpoints"), 7, variables)
  workdir_lib.save_model(str(workdir), 7, variables)  # The trained network alone, as stages do.
  config = {"stage": "teacher",
            "model": {"name": "iresnet18", "width": 4, "embedding_size": 16, "use_se": False,
                      "dropout": 0.0, "dtype": "float32"},
            "data": {"source": "synthetic", "data_dir": "",
                     "synthetic": json.loads(SPEC.to_json())}}
  (workdir / "config.json").write_text(json.dumps(config))
  pth = root / "tiny_r18.pth"
  torch_checkpoint.save_state_dict(pth, torch_checkpoint.export_iresnet(variables))
  return {"variables": variables, "older": older, "workdir": str(workdir), "pth": str(pth)}


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  """The same synthetic pairs as an RFW folder and as .bin files; a 32x32 .bin."""
  root = tmp_path_factory.mktemp("data")
  faces = synthetic.generate(SPEC)
  synthetic.export_rfw(faces, root / "rfw")
  reader = rfw.RFWReader(str(root / "rfw"))
  bins = []
  for group in reader.groups:
    images, issame = [], []
    for pair in reader.iter_pairs(group):
      images += [pair.image1, pair.image2]
      issame.append(pair.same)
    bins.append(str(root / f"bin_{group}_test.bin"))
    verification_bin.write_verification_bin(bins[-1], images, issame)
  big_faces = synthetic.generate(
      dataclasses.replace(SPEC, num_groups=1, image_size=32, difficulty=()))
  big = big_faces.eval_images["group_a"]
  pairs, issame = big_faces.eval_pairs["group_a"], big_faces.eval_issame["group_a"]
  big_bin = str(root / "big_test.bin")
  verification_bin.write_verification_bin(big_bin, [_png(big[i]) for i in pairs.reshape(-1)],
                                          list(issame))
  corrupt = root / "corrupt_test.bin"
  corrupt.write_bytes(open(bins[0], "rb").read()[:200])
  return {"faces": faces, "rfw": str(root / "rfw"), "bins": bins, "big_bin": big_bin,
          "big": (big, pairs, issame), "corrupt": str(corrupt)}


def _run(checkpoint, arch, data, out, **kwargs):
  return evaluate_lib.evaluate(checkpoint, arch, data, str(out), batch_size=BATCH,
                               verbose=False, **kwargs)


def _accuracies(report):
  (entry,) = report["models"].values()
  return {g: (e["accuracy"], e["accuracy_noflip"]) for g, e in entry["groups"].items()}


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = np.asarray(value)
  return out


def _assert_same_tree(a, b):
  a, b = _flatten(a), _flatten(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- The Orbax reader ------------------------------------------------------------------


def test_orbax_reader_finds_the_latest_step_and_restores_only_the_backbone(model_files):
  workdir = model_files["workdir"]
  for path, read in ((workdir, "model/7"), (f"{workdir}/model", "model/7"),
                     (f"{workdir}/checkpoints", "checkpoints/7"),
                     (f"{workdir}/checkpoints/7", "checkpoints/7"),
                     (f"{workdir}/checkpoints/7/default", "checkpoints/7")):
    variables, info = orbax_checkpoint.load_backbone_variables(path)
    assert sorted(variables) == ["batch_stats", "params"]
    _assert_same_tree(variables, model_files["variables"])
    assert info.path == os.path.join(workdir, read)
    assert (info.step, info.workdir, info.name) == (7, workdir, "teacher_run")
    assert info.config["model"]["width"] == 4
  older, info = orbax_checkpoint.load_backbone_variables(f"{workdir}/checkpoints/3")
  assert info.step == 3
  _assert_same_tree(older, model_files["older"])
  assert orbax_checkpoint.describe_iresnet(older) == {
      "name": "iresnet18", "stage_depths": (2, 2, 2, 2), "width": 4, "embedding_size": 16,
      "use_se": False, "image_size": 16}


def test_orbax_reader_refuses_what_is_no_checkpoint(tmp_path):
  with pytest.raises(UserError, match="checkpoint does not exist"):
    orbax_checkpoint.load_backbone_variables(tmp_path / "missing")
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(UserError, match="holds no finished checkpoint step"):
    orbax_checkpoint.load_backbone_variables(tmp_path)
  adaptor = tmp_path / "adaptor"
  workdir_lib.save_model(str(adaptor), 2, {"params": {"dense": {"kernel": np.ones((4, 2))}}})
  with pytest.raises(UserError, match=r"holds no backbone parameters \(params has \['dense'\]"):
    orbax_checkpoint.load_backbone_variables(adaptor)


# --- Reports ---------------------------------------------------------------------------


def test_orbax_and_pth_of_the_same_weights_give_the_same_report(model_files, data_files,
                                                                 tmp_path):
  # No arch settings: the workdir's config.json supplies them.
  orbax = _run(model_files["workdir"], None, [data_files["rfw"]] + data_files["bins"],
               tmp_path / "orbax")
  pth = _run(model_files["pth"], ARCH, [data_files["rfw"]], tmp_path / "pth")
  assert set(orbax["models"]) == {"teacher_run"} and set(pth["models"]) == {"tiny_r18"}
  accuracies = _accuracies(orbax)
  assert list(accuracies) == ["group_a", "group_b", "bin_group_a", "bin_group_b"]
  assert {g: accuracies[g] for g in ("group_a", "group_b")} == _accuracies(pth)
  # The same images as .bin files (group = file stem without _test) and as RFW folder.
  assert accuracies["bin_group_a"] == accuracies["group_a"]
  assert accuracies["bin_group_b"] == accuracies["group_b"]
  assert len({acc for pair in accuracies.values() for acc in pair}) > 1

  assert REPORT_FILES <= set(os.listdir(tmp_path / "orbax"))
  assert not [n for n in os.listdir(tmp_path / "orbax") if n.startswith(".")]
  with open(tmp_path / "orbax" / "report.json") as f:
    stored = json.load(f)
  entry = stored["models"]["teacher_run"]
  for group in entry["groups"].values():
    assert {"accuracy", "accuracy_std", "accuracy_noflip", "tar_at_far"} <= set(group)
    assert 0.0 <= group["accuracy"] <= 100.0 and group["num_pairs"] == 40
    assert "roc" not in group
  assert {"mean", "std", "ser"} <= set(entry)
  config = stored["config"]
  assert config["checkpoint_format"] == "orbax" and config["step"] == 7
  assert config["checkpoint"] == os.path.join(model_files["workdir"], "model", "7")
  assert config["model"] == {"arch": "iresnet18", "width": 4, "embedding_size": 16,
                             "use_se": False, "image_size": 16}
  assert config["model_settings_from"]["width"] == "config.json"
  assert [d["groups"] for d in config["data"]] == [["group_a", "group_b"], ["bin_group_a"],
                                                   ["bin_group_b"]]
  assert pth["config"]["model_settings_from"]["width"] == "flag"


def test_images_of_another_size_are_resized_with_a_warning(model_files, data_files,
                                                           tmp_path, capsys):
  # The same resampling done by hand, given as arrays, must give the same accuracy.
  big, pairs, issame = data_files["big"]
  small = np.stack([np.asarray(Image.fromarray(x).resize((16, 16), Image.BILINEAR))
                    for x in big])
  arrays = {"by_hand": sources.VerificationSet(images=small, pairs=pairs, issame=issame)}
  report = evaluate_lib.evaluate(model_files["pth"], ARCH, [data_files["big_bin"], arrays],
                                 str(tmp_path), batch_size=BATCH, name="mine")
  captured = capsys.readouterr()
  assert captured.err.count("warning:") == 1
  assert ("big_test.bin: images of 32x32 pixels, the model takes 16x16; resizing them with "
          "Pillow bilinear") in captured.err
  assert [d["resized_from"] for d in report["config"]["data"]] == [[[32, 32]], None]
  assert len(report["config"]["warnings"]) == 1
  accuracies = _accuracies(report)
  assert list(report["models"]) == ["mine"]
  assert accuracies["big"] == accuracies["by_hand"]
  assert "Verification accuracy (%) per group" in captured.out
  assert "No-flip accuracy" in captured.out


def test_synthetic_by_name_is_the_workdirs_configured_set(model_files, data_files, tmp_path):
  faces = data_files["faces"]
  arrays = {f"copy_{g}": sources.VerificationSet(faces.eval_images[g], faces.eval_pairs[g],
                                                 faces.eval_issame[g])
            for g in SPEC.group_names}
  report = _run(model_files["workdir"], None, ["synthetic", arrays], tmp_path)
  assert os.path.isfile(synthetic.cache_path(SPEC, tmp_path / "data"))
  accuracies = _accuracies(report)
  for group in SPEC.group_names:
    assert accuracies[group] == accuracies[f"copy_{group}"]


def _pairs_list_planner():
  """A verification format made up for the test: <group>.pairs.txt, one `image_a image_b
  same` line per pair, image paths relative to the file."""

  def groups(path):
    return (os.path.basename(path)[:-len(".pairs.txt")],)

  def plan(path):
    images, rows = [], []
    lines = [line.split() for line in open(path).read().splitlines() if line.strip()]
    for a, b, _ in lines:
      for name in (a, b):
        image = (None, os.path.join(os.path.dirname(path), name))
        if image not in images:
          images.append(image)
        rows.append(images.index(image))
    return [pairs.GroupPlan(groups(path)[0], images, np.reshape(rows, (-1, 2)),
                            np.array([same == "1" for _, _, same in lines]))]

  return pairs.Planner(groups, plan, "a <group>.pairs.txt file",
                       claims=lambda path: path.endswith(".pairs.txt"))


def test_a_new_verification_format_is_one_planner_and_one_registry_line(
    model_files, data_files, tmp_path, monkeypatch):
  reader = rfw.RFWReader(data_files["rfw"])
  lines = [f"{os.path.relpath(reader.image_path('group_a', p.name1, p.index1), reader.test_dir)} "
           f"{os.path.relpath(reader.image_path('group_a', p.name2, p.index2), reader.test_dir)} "
           f"{int(p.same)}" for p in reader.pairs("group_a")]
  listing = os.path.join(reader.test_dir, "listed.pairs.txt")
  with open(listing, "w") as f:
    f.write("\n".join(lines) + "\n")
  # Claims specific files, so it goes before "bin", which takes any file.
  monkeypatch.setattr(pairs, "PLANNERS", {"pairs_list": _pairs_list_planner(),
                                          **pairs.PLANNERS})
  try:
    report = _run(model_files["pth"], ARCH, [listing, data_files["rfw"]], tmp_path)
  finally:
    os.remove(listing)
  accuracies = _accuracies(report)
  assert accuracies["listed"] == accuracies["group_a"]
  assert report["config"]["data"][0]["format"] == "pairs_list"


def test_evaluation_and_training_data_need_neither_stages_nor_builders():
  for module in ("evaluate.py", "evaluate_data.py", "interop/resolve.py", "interop/command_line.py",
                 "data/sources.py", "data/tfds_input.py", "data/pairs.py", "data/prepared.py"):
    with open(os.path.join(ROOT, "mstkd_jax", module)) as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        imported |= {f"{node.module}.{a.name}" for a in node.names}
    assert not [m for m in imported if m.startswith("mstkd_jax.stages")
                or m == "mstkd_jax.formats.tfds_builders"], module


# --- Errors ----------------------------------------------------------------------------


def _rgba_set(data_files):
  big, pairs, issame = data_files["big"]
  return {"x": sources.VerificationSet(np.zeros(big.shape[:3] + (4,), np.uint8), pairs,
                                       issame)}


@pytest.mark.parametrize("case,error,message", [
    ("missing_checkpoint", UserError, "does not exist; expected a stage workdir"),
    ("missing_data", UserError, "does not exist; expected a verification .bin"),
    ("unknown_arch", evaluate_lib.FlagError, "--arch='resnet9': unknown architecture"),
    ("bad_image_size", evaluate_lib.FlagError, "--image_size=20: expected a multiple of 16"),
    ("no_data", evaluate_lib.FlagError, "--data: no data sources"),
    ("pth_of_other_arch", UserError, "does not fit this IResNet"),
    ("orbax_with_other_width", UserError, "does not fit the model iresnet18 width=8"),
    ("corrupt_bin", UserError, "not a readable pickle"),
    ("not_rgb", UserError, "cannot be fed to the model; expected uint8 RGB"),
    ("group_twice", UserError, "'group_a' appears in both"),
    ("unknown_scale", evaluate_lib.FlagError, "unknown synthetic scale 'huge'"),
])
def test_bad_inputs_stop_with_their_message_and_write_nothing(case, error, message,
                                                              model_files, data_files,
                                                              tmp_path):
  workdir, pth, rfw_dir = model_files["workdir"], model_files["pth"], data_files["rfw"]
  args = {
      "missing_checkpoint": (str(tmp_path / "nope.pth"), ARCH, [rfw_dir]),
      "missing_data": (pth, ARCH, [str(tmp_path / "African_test.bin")]),
      "unknown_arch": (pth, dict(ARCH, arch="resnet9"), [rfw_dir]),
      "bad_image_size": (pth, dict(ARCH, image_size=20), [rfw_dir]),
      "no_data": (pth, ARCH, []),
      "pth_of_other_arch": (pth, dict(ARCH, arch="iresnet34"), [rfw_dir]),
      "orbax_with_other_width": (workdir, {"width": 8}, [rfw_dir]),
      "corrupt_bin": (pth, ARCH, [data_files["corrupt"]]),
      "not_rgb": (pth, ARCH, [_rgba_set(data_files)]),
      "group_twice": (workdir, None, [rfw_dir, data_files["bins"][0], "synthetic"]),
      "unknown_scale": (workdir, None, ["synthetic:huge"]),
  }[case]
  out = tmp_path / "out"
  with pytest.raises(error, match=None) as info:
    _run(*args, out)
  assert message in str(info.value)
  assert not out.exists()


def test_a_pth_of_another_input_size_is_refused_naming_its_input_size(model_files, data_files,
                                                                      tmp_path):
  with pytest.raises(UserError) as info:
    _run(model_files["pth"], dict(ARCH, image_size=32), [data_files["rfw"]], tmp_path / "out")
  message = str(info.value)
  assert "does not fit this IResNet" in message and "image_size=32" in message
  assert "its input size is 16: --image_size=16" in message
  assert not (tmp_path / "out").exists()
  # The same fields and the same inference as the Orbax reader's.
  state_dict = torch_checkpoint.load_state_dict(model_files["pth"])
  assert resolve.describe_state_dict(state_dict) == orbax_checkpoint.describe_iresnet(
      model_files["variables"])


def test_an_orbax_checkpoint_of_another_input_size_is_refused_naming_its_input_size(
    model_files, data_files, tmp_path):
  with pytest.raises(UserError) as info:
    _run(model_files["workdir"], {"image_size": 32}, [data_files["rfw"]], tmp_path / "out")
  assert "does not fit the model iresnet18 width=4" in str(info.value)
  assert "the checkpoint looks like: iresnet18 width=4 embedding_size=16 use_se=False " \
         "image_size=16" in str(info.value)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mstkd_jax.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["evaluate", "export", "embed"])
def test_help_lists_the_model_flags(command):
  """--checkpoint and the model flags are the command's own (key) flags: in --help, not
  only in --helpfull."""
  result = subprocess.run([sys.executable, "-m", f"mstkd_jax.{command}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  listed = {line.split(":")[0].strip() for line in result.stdout.splitlines()
            if line.startswith("  --")}
  assert {"--checkpoint", "--arch", "--width", "--embedding_size", "--[no]use_se",
          "--image_size", "--out"} <= listed, result.stdout
  assert "ONNX" in result.stdout


def test_command_line_errors_are_one_line_with_exit_codes(model_files, data_files, tmp_path):
  # Both are found before JAX is imported, so these runs take well under a second.
  out = tmp_path / "out"
  flag = _cli(f"--checkpoint={model_files['pth']}", "--image_size=20",
              f"--data={data_files['rfw']}", f"--out={out}")
  assert flag.returncode == 2
  assert flag.stderr == "error: --image_size=20: expected a multiple of 16 (the IResNet " \
                        "halves its input four times)\n"
  missing = tmp_path / "African_test.bin"
  data = _cli(f"--checkpoint={model_files['workdir']}", f"--data={missing}", f"--out={out}")
  assert data.returncode == 1
  assert data.stderr == (f"error: --data={missing}: {missing} does not exist; expected a "
                         "verification .bin file, an RFW folder, or synthetic[:scale]\n")
  assert not out.exists()


def test_command_line_prints_the_table_and_writes_the_report(model_files, data_files, tmp_path):
  result = _cli(f"--checkpoint={model_files['pth']}", "--arch=iresnet18", "--width=4",
                "--embedding_size=16", "--image_size=16", f"--batch_size={BATCH}",
                f"--data={data_files['bins'][0]}", f"--out={tmp_path}", "--name=cli")
  assert result.returncode == 0, result.stderr
  assert "Verification accuracy (%) per group" in result.stdout
  with open(tmp_path / "report.json") as f:
    assert list(json.load(f)["models"]["cli"]["groups"]) == ["bin_group_a"]


def test_several_checkpoints_are_one_row_each(model_files, data_files, tmp_path):
  """The Orbax workdir and the .pth of the same weights, evaluated together: two rows with
  the same accuracies, each checkpoint's record in config["models"]."""
  report = _run([model_files["workdir"], model_files["pth"]], ARCH, [data_files["rfw"]],
                tmp_path / "both")
  assert list(report["models"]) == ["teacher_run", "tiny_r18"]
  rows = {m: {g: e["accuracy"] for g, e in entry["groups"].items()}
          for m, entry in report["models"].items()}
  assert rows["teacher_run"] == rows["tiny_r18"]
  alone = _run(model_files["pth"], ARCH, [data_files["rfw"]], tmp_path / "alone")
  assert alone["models"]["tiny_r18"]["groups"] == report["models"]["tiny_r18"]["groups"]
  models = report["config"]["models"]
  assert [models[m]["checkpoint_format"] for m in ("teacher_run", "tiny_r18")] == [
      "orbax", "pytorch"]
  assert report["config"]["checkpoint"] == models["teacher_run"]["checkpoint"]
  with pytest.raises(evaluate_lib.FlagError, match="several checkpoints are named 'x'"):
    _run([model_files["workdir"], model_files["pth"]], ARCH, [data_files["rfw"]],
         tmp_path / "same_names", name=["x", "x"])
  with pytest.raises(evaluate_lib.FlagError, match="1 names for 2 checkpoints"):
    _run([model_files["workdir"], model_files["pth"]], ARCH, [data_files["rfw"]],
         tmp_path / "one_name", name="x")
  assert not (tmp_path / "same_names").exists() and not (tmp_path / "one_name").exists()


def test_command_line_takes_several_checkpoints_and_names(model_files, data_files, tmp_path):
  result = _cli(f"--checkpoint={model_files['workdir']}", f"--checkpoint={model_files['pth']}",
                "--arch=iresnet18", "--width=4", "--embedding_size=16", "--image_size=16",
                f"--batch_size={BATCH}", f"--data={data_files['bins'][0]}",
                f"--out={tmp_path}", "--name=orbax", "--name=pth")
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "report.json") as f:
    assert list(json.load(f)["models"]) == ["orbax", "pth"]
  assert "No-flip accuracy (%) of pth:" in result.stdout
