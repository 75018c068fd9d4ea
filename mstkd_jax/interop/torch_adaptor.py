"""The MST-KD authors' PyTorch adaptor checkpoints (.pth) as our adaptor's variables.

The format: a state_dict saved with torch.save(adaptor.state_dict(), path), one of
  FC_mapping (one linear layer; our "SL"):
    fc.weight [D, G * D_t], fc.bias [D]
  DualLayer_Adaptor (linear, LeakyReLU(0.01), optional Dropout(0.2), linear; our "DuL"):
    fc1.weight [M, G * D_t], fc1.bias [M], fc2.weight [D, M], fc2.bias [D]
    and, whether or not they were used, parameters of an attention layer (attention.*:
    in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias) and its key_vector and
    value_vector [batch, M]. The file does not record whether the attention (or a
    LeakyReLU after fc2) ran in training; the paper's adaptors use neither, and they are
    read as the plain DuL. Those tensors are ignored and listed.
where G * D_t is the concatenated teacher embeddings (G teachers of D_t each), D the
adaptor's output, M its hidden size, which our adaptor has equal to D (the authors'
middle_layer_size 512 = D). The adaptor's output is L2-normalized where it is used, as ours
does inside the module. DLDPO is DuL trained with dropout, which has no parameters: a DuL
file serves both kinds (dropout is off in inference). PyTorch's Linear stores weight
[out, in] and computes x W^T + b; our Dense stores kernel [in, out].
"""

import os

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_checkpoint

_LAYOUTS = {"SL": {"fc": "fc1"}, "DuL": {"fc1": "fc1", "fc2": "fc2"}}
_IGNORED_NAMES = ("key_vector", "value_vector")
_IGNORED_PREFIX = "attention."


def _found(state_dict) -> str:
  shown = [f"{k} {tuple(np.shape(v))}" for k, v in list(state_dict.items())[:12]]
  more = f" ... ({len(state_dict)} tensors)" if len(state_dict) > 12 else ""
  return ", ".join(shown) + more if shown else "no tensors"


def _linear(path: str, state_dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(weight [out, in], bias [out]) of Linear `name`, or UserError naming what is wrong."""
  weight, bias = state_dict[f"{name}.weight"], state_dict[f"{name}.bias"]
  if np.ndim(weight) != 2 or np.shape(bias) != np.shape(weight)[:1]:
    raise UserError(f"{path}: {name}.weight {tuple(np.shape(weight))} and {name}.bias "
                    f"{tuple(np.shape(bias))} are not a linear layer's; expected weight "
                    "[out, in] and bias [out]")
  return weight, bias


def load_adaptor(path: str | os.PathLike, input_size: int) -> tuple[str, dict, list[str]]:
  """Reads an authors' adaptor .pth into variables of our adaptor.

  Args:
    path: the .pth (a state_dict as the module docstring describes, or a checkpoint dict
      holding one; a DataParallel "module." prefix is removed).
    input_size: the adaptor input the caller feeds, G * D_t (the concatenated teacher
      embeddings).

  Returns:
    (kind, variables, ignored_keys): kind "SL" or "DuL" (a DuL file also serves "DLDPO");
    variables {"params": {"fc1": {"kernel" [G * D_t, D], "bias" [D]}, and for DuL "fc2":
    {"kernel" [D, D], "bias" [D]}}} (float32 numpy) for
    `models.create("adaptor", kind=kind, embedding_size=D)`; the names of the tensors
    read and not used (attention, key_vector, value_vector), in file order.

  Raises:
    UserError (one line naming the file): unreadable file (as
      torch_checkpoint.read_state_dict), neither layout (what was found is listed), an
      input size other than `input_size` (both named), a DuL whose hidden size differs
      from its output, or NaN/Inf in a used tensor (the first named).
  """
  path = os.fspath(path)
  state_dict, _ = torch_checkpoint.read_state_dict(path)
  ignored = [k for k in state_dict if k in _IGNORED_NAMES or k.startswith(_IGNORED_PREFIX)]
  used = {k: v for k, v in state_dict.items() if k not in ignored}
  kind = next((kind for kind, layers in _LAYOUTS.items()
               if set(used) == {f"{n}.{p}" for n in layers for p in ("weight", "bias")}),
              None)
  if kind is None:
    raise UserError(f"{path}: not an MST-KD adaptor state_dict; expected fc.weight and "
                    "fc.bias (FC_mapping, SL) or fc1.weight, fc1.bias, fc2.weight and "
                    f"fc2.bias (DualLayer_Adaptor, DuL), found {_found(state_dict)}")
  layers = {name: _linear(path, used, name) for name in _LAYOUTS[kind]}
  first = next(iter(layers))
  found_in = np.shape(layers[first][0])[1]
  if found_in != input_size:
    raise UserError(f"{path}: the adaptor takes {found_in} inputs ({first}.weight "
                    f"{tuple(np.shape(layers[first][0]))}), but the teacher embeddings "
                    f"given are {input_size} wide (G teachers x D_t); expected {input_size}")
  if kind == "DuL":
    hidden, out = np.shape(layers["fc1"][0])[0], np.shape(layers["fc2"][0])
    if out != (hidden, hidden):
      raise UserError(f"{path}: fc2.weight is {out}, fc1 has {hidden} outputs; expected "
                      f"fc2.weight [{hidden}, {hidden}] (our DuL's hidden layer is as wide "
                      "as its output)")
  torch_checkpoint.check_finite(used, path)
  params = {ours: {"kernel": np.asarray(layers[theirs][0], np.float32).T.copy(),
                   "bias": np.asarray(layers[theirs][1], np.float32)}
            for theirs, ours in _LAYOUTS[kind].items()}
  return kind, {"params": params}, ignored
