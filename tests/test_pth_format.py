"""The .pth format without PyTorch (interop/pth_format.py; torch_checkpoint's search for the
state_dict inside a checkpoint dict and its finite check): what torch.save writes is read
back exactly, and nothing a file holds runs. Tests that need torch skip without it.
"""

import collections
import os
import pickle
import shlex
import zipfile

import ml_dtypes
import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.interop import pth_format, torch_checkpoint as tc


# --- Reading what torch.save writes ----------------------------------------------------


def test_loader_rebuilds_dtypes_views_and_unwraps_module_prefix(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  tensors = {"transposed": base.t(), "offset_view": base[1:, 2:],
             "half": torch.randn(5).half(), "bfloat16": torch.randn(5).bfloat16(),
             "scalar_long": torch.tensor(7), "empty": torch.zeros(0, 3),
             "parameter": torch.nn.Parameter(torch.ones(2))}
  path = tmp_path / "wrapped.pth"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tensors.items()}},
             path)
  loaded = tc.load_state_dict(path)
  assert list(loaded) == list(tensors)
  for key, tensor in tensors.items():
    expected = tensor.detach().float().numpy()
    assert loaded[key].shape == expected.shape, key
    np.testing.assert_array_equal(np.asarray(loaded[key], np.float32), expected, err_msg=key)
  assert loaded["bfloat16"].dtype.name == "bfloat16"
  assert loaded["scalar_long"].dtype == np.int64


def test_legacy_format_is_refused_with_resave_hint(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "legacy.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(UserError, match="legacy") as info:
    tc.load_state_dict(path)
  assert str(path) in str(info.value) and "torch.save" in str(info.value)


# --- Refusals --------------------------------------------------------------------------


class _Payload:
  """Pickles as a call of `function(*args)`: what a malicious checkpoint would run."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _zip_with_pickle(path, data_pkl: bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("attack", ["open", "system", "eval", "nested"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, attack):
  marker = tmp_path / "marker"
  payloads = {
      "open": _Payload(open, str(marker), "w"),
      "system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
      "eval": _Payload(eval, f"open({str(marker)!r}, 'w')"),
      "nested": collections.OrderedDict(
          [("conv1.weight", 1.0), ("bn1.weight", _Payload(open, str(marker), "w"))]),
  }
  function = {"system": os.system, "eval": eval}.get(attack, open)
  path = tmp_path / "evil.pth"
  _zip_with_pickle(path, pickle.dumps(payloads[attack], protocol=2))
  with pytest.raises(UserError) as info:
    tc.load_state_dict(path)
  message = str(info.value)
  assert str(path) in message
  assert "refused to load the global" in message
  assert f".{function.__name__}" in message  # Protocol 2 spells builtins __builtin__.
  assert not marker.exists()


@pytest.fixture(name="saved")
def _saved(tmp_path):
  path = tmp_path / "good.pth"
  tc.save_state_dict(path, {"w": np.arange(4096, dtype=np.float32)})
  return path.read_bytes()


@pytest.mark.parametrize("damage, expected", [
    (lambda data: data[:len(data) // 2], "truncated"),
    (lambda data: data[:-10], "zip"),
    (lambda data: data.replace(np.float32(7).tobytes(), b"\0\0\0\0", 1), "CRC"),
    (lambda data: b"not a checkpoint at all", "not a PyTorch checkpoint"),
    (lambda data: pth_format._LEGACY_MAGIC + b"rest", "legacy"),
    (lambda data: b"", "not a PyTorch checkpoint"),
])
def test_damaged_file_error_names_the_file(tmp_path, saved, damage, expected):
  path = tmp_path / "damaged.pth"
  path.write_bytes(damage(saved))
  with pytest.raises(UserError, match=expected) as info:
    tc.load_state_dict(path)
  assert str(path) in str(info.value)


def test_missing_file_error_names_the_file(tmp_path):
  with pytest.raises(UserError, match="missing.pth"):
    tc.load_state_dict(tmp_path / "missing.pth")


def test_pickle_cannot_modify_the_loader(tmp_path):
  # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with slot state {"_function": "x"}.
  data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\t\x00\x00\x00_function"
          b"X\x01\x00\x00\x00xs\x86b.")
  path = tmp_path / "tamper.pth"
  _zip_with_pickle(path, data)
  with pytest.raises(UserError, match="tamper.pth"):
    tc.load_state_dict(path)
  rebuild = pth_format._SAFE_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
  assert getattr(rebuild, "_function", None) != "x"
  good = tmp_path / "good.pth"
  tc.save_state_dict(good, {"w": np.ones(3, np.float32)})
  np.testing.assert_array_equal(tc.load_state_dict(good)["w"], np.ones(3, np.float32))


# --- Checkpoints that hold more than the backbone --------------------------------------


@pytest.mark.parametrize("key", tc.STATE_DICT_KEYS)
def test_state_dict_found_under_common_keys(tmp_path, key):
  torch = pytest.importorskip("torch")
  tensors = {"w": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)}
  path = tmp_path / f"{key}.pth"
  torch.save({"epoch": 1, "best_acc": 0.5, "args": {"lr": 0.1, "steps": [1, 2]},
              key: {f"module.{k}": v for k, v in tensors.items()}}, path)
  state_dict, note = tc.read_state_dict(path)
  assert note == f"state_dict under [{key!r}], 'module.' prefix removed"
  assert list(state_dict) == ["w", "b"]
  np.testing.assert_array_equal(state_dict["w"], [0.0, 1.0, 2.0])
  assert state_dict["b"].dtype == np.int64
  # The most specific key wins; nesting is followed.
  path = tmp_path / "nested.pth"
  torch.save({"model": {"state_dict": tensors}, "state_dict_backbone_ema": {}}, path)
  assert tc.read_state_dict(path)[1] == "state_dict under ['model']['state_dict']"
  path = tmp_path / "plain.pth"
  torch.save(tensors, path)
  assert tc.read_state_dict(path)[1] == ""


def test_checkpoint_without_a_known_key_lists_what_it_holds(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ema.pth"
  torch.save({"epoch": 1, "ema_weights": {"w": torch.ones(2)}, "head": {"x": torch.ones(1)}},
             path)
  with pytest.raises(UserError) as info:
    tc.load_state_dict(path)
  message = str(info.value)
  assert message.startswith(f"{path}: expected a state_dict")
  assert "'state_dict_backbone'" in message and "'model'" in message
  assert "found dicts of tensors under 'ema_weights', 'head'" in message
  path = tmp_path / "model_list.pth"
  torch.save({"model": [torch.ones(1)]}, path)
  with pytest.raises(UserError, match="found non-tensor entries 'model'"):
    tc.load_state_dict(path)


def test_checkpoint_extras_still_run_nothing(tmp_path):
  # The optimizer part of a checkpoint is read by the same restricted unpickler.
  marker = tmp_path / "marker"
  payload = {"state_dict_backbone": collections.OrderedDict(), "state_optimizer":
             {"state": {0: _Payload(os.system, f"touch {shlex.quote(str(marker))}")}}}
  path = tmp_path / "evil.pt"
  _zip_with_pickle(path, pickle.dumps(payload, protocol=2))
  with pytest.raises(UserError, match="refused to load the global .*system"):
    tc.load_state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_every_float_dtype_is_checked_and_integers_are_not(tmp_path, dtype):
  path = tmp_path / "half.pth"
  tc.save_state_dict(path, {"bn.num_batches_tracked": np.array(-1, np.int64),
                            "w": np.array([1.0, np.inf], dtype)})
  with pytest.raises(UserError, match="half.pth: the checkpoint holds Inf in w "):
    tc.check_finite(tc.load_state_dict(path), str(path))
