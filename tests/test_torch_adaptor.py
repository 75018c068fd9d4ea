"""The authors' PyTorch adaptor files (interop/torch_adaptor.py): PyTorch twins of their
FC_mapping (SL) and DualLayer_Adaptor (DuL), written here from the format's description and
saved with torch.save, give our adaptor's outputs once read; bad files stop with one line.
"""

import numpy as np
import pytest

from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_adaptor, torch_checkpoint

TEACHERS, TEACHER_DIM, DIM, BATCH = 4, 16, 16, 8
INPUT = TEACHERS * TEACHER_DIM


def _twins(torch):
  nn = torch.nn

  class FCMapping(nn.Module):
    """One linear layer, named `fc`."""

    def __init__(self, in_features, out_features):
      super().__init__()
      self.fc = nn.Linear(in_features, out_features)

    def forward(self, x):
      return self.fc(x)

  class DualLayerAdaptor(nn.Module):
    """fc1, LeakyReLU(0.01), fc2, with dropout 0.2 before the activation where trained so,
    and an attention layer with its key and value vectors that the paper's adaptors leave
    unused (their parameters are in the state_dict all the same)."""

    def __init__(self, in_features, middle, out_features, batch_size=BATCH, dropout=False):
      super().__init__()
      self.fc1 = nn.Linear(in_features, middle)
      self.attention = nn.MultiheadAttention(embed_dim=middle, num_heads=1)
      self.act = nn.LeakyReLU(negative_slope=0.01)
      self.fc2 = nn.Linear(middle, out_features)
      self.drop = nn.Dropout(p=0.2)
      self.dropout = dropout
      self.key_vector = nn.Parameter(torch.randn(batch_size, middle))
      self.value_vector = nn.Parameter(torch.randn(batch_size, middle))

    def forward(self, x):
      hidden = self.fc1(x)
      if self.dropout:
        hidden = self.drop(hidden)
      return self.fc2(self.act(hidden))

  return FCMapping, DualLayerAdaptor


def _teacher_embeddings(seed=0):
  return np.random.default_rng(seed).normal(size=(BATCH, INPUT)).astype(np.float32)


def _reference(torch, twin, x):
  """The authors' use of the adaptor: its output L2-normalized (F.normalize)."""
  with torch.no_grad():
    return torch.nn.functional.normalize(twin.eval()(torch.from_numpy(x))).numpy()


def _ours(kind, variables, x, train=False):
  adaptor = models.create("adaptor", kind=kind, embedding_size=DIM)
  return np.asarray(adaptor.apply(variables, x, train=train))


def _max_relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


# float32 on both sides, one or two matmuls over at most 64 inputs: rounding of ~64 x 1.2e-7
# relative at worst, on unit vectors; 1e-5 leaves room and still catches any layout error.
TOLERANCE = 1e-5


def test_an_fc_mapping_file_is_our_sl_adaptor(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  twin = _twins(torch)[0](INPUT, DIM)
  path = tmp_path / "fc_mapping.pth"
  torch.save(twin.state_dict(), path)
  kind, variables, ignored = torch_adaptor.load_adaptor(path, INPUT)
  assert (kind, ignored) == ("SL", [])
  assert variables["params"]["fc1"]["kernel"].shape == (INPUT, DIM)
  x = _teacher_embeddings()
  assert _max_relative_error(_ours(kind, variables, x), _reference(torch, twin, x)) < TOLERANCE


@pytest.mark.parametrize("dropout", [False, True])
def test_a_dual_layer_file_is_our_dul_adaptor_and_serves_dldpo(tmp_path, dropout):
  torch = pytest.importorskip("torch")
  torch.manual_seed(1)
  twin = _twins(torch)[1](INPUT, DIM, DIM, dropout=dropout)
  path = tmp_path / "dual_layer.pth"
  torch.save(twin.state_dict(), path)
  kind, variables, ignored = torch_adaptor.load_adaptor(path, INPUT)
  assert kind == "DuL"
  assert ignored == ["key_vector", "value_vector", "attention.in_proj_weight",
                     "attention.in_proj_bias", "attention.out_proj.weight",
                     "attention.out_proj.bias"]
  x = _teacher_embeddings(seed=1)
  reference = _reference(torch, twin, x)
  assert _max_relative_error(_ours("DuL", variables, x), reference) < TOLERANCE
  # DLDPO's dropout has no parameters: the same variables, and in inference the same outputs.
  assert _max_relative_error(_ours("DLDPO", variables, x), reference) < TOLERANCE


def test_a_data_parallel_prefix_is_removed(tmp_path):
  torch = pytest.importorskip("torch")
  twin = _twins(torch)[0](INPUT, DIM)
  path = tmp_path / "wrapped.pth"
  torch.save({f"module.{k}": v for k, v in twin.state_dict().items()}, path)
  kind, variables, _ = torch_adaptor.load_adaptor(path, INPUT)
  np.testing.assert_array_equal(variables["params"]["fc1"]["bias"],
                                twin.fc.bias.detach().numpy())


def _saved(tmp_path, state_dict, name="adaptor.pth"):
  path = tmp_path / name
  torch_checkpoint.save_state_dict(path, state_dict)
  return path


def _dul(hidden=DIM, inputs=INPUT):
  rng = np.random.default_rng(0)
  return {"fc1.weight": rng.normal(size=(hidden, inputs)).astype(np.float32),
          "fc1.bias": np.zeros(hidden, np.float32),
          "fc2.weight": rng.normal(size=(DIM, hidden)).astype(np.float32),
          "fc2.bias": np.zeros(DIM, np.float32)}


def test_an_input_size_other_than_the_teachers_names_both(tmp_path):
  path = _saved(tmp_path, _dul(inputs=TEACHER_DIM * 3))
  with pytest.raises(UserError) as info:
    torch_adaptor.load_adaptor(path, INPUT)
  message = str(info.value)
  assert message.startswith(f"{path}: the adaptor takes 48 inputs (fc1.weight (16, 48))")
  assert "given are 64 wide" in message and "\n" not in message


def test_an_unknown_layout_lists_what_was_found(tmp_path):
  state_dict = {**_dul(), "fc3.weight": np.ones((DIM, DIM), np.float32)}
  path = _saved(tmp_path, state_dict)
  with pytest.raises(UserError) as info:
    torch_adaptor.load_adaptor(path, INPUT)
  message = str(info.value)
  assert message.startswith(f"{path}: not an MST-KD adaptor state_dict; expected fc.weight")
  assert "found fc1.weight (16, 64), fc1.bias (16,)" in message and "fc3.weight (16, 16)" in message
  for bad in ({"fc.weight": np.ones((DIM, INPUT), np.float32)},       # no bias
              {**_dul(), "fc.weight": np.ones((DIM, INPUT), np.float32),
               "fc.bias": np.ones(DIM, np.float32)}):                  # both layouts
    with pytest.raises(UserError, match="not an MST-KD adaptor"):
      torch_adaptor.load_adaptor(_saved(tmp_path, bad), INPUT)
  with pytest.raises(UserError, match="fc2.weight is \\(16, 32\\), fc1 has 32 outputs"):
    torch_adaptor.load_adaptor(_saved(tmp_path, _dul(hidden=32)), INPUT)


def test_a_nan_weight_is_refused_naming_the_file_and_tensor(tmp_path):
  state_dict = _dul()
  state_dict["fc2.bias"][3] = np.nan
  state_dict["key_vector"] = np.full((BATCH, DIM), np.nan, np.float32)  # ignored: unused
  path = _saved(tmp_path, state_dict)
  with pytest.raises(UserError) as info:
    torch_adaptor.load_adaptor(path, INPUT)
  assert str(info.value) == (f"{path}: the checkpoint holds NaN in fc2.bias (1 of 16 values; "
                             "a diverged run?); expected finite weights: use an earlier "
                             "checkpoint")
