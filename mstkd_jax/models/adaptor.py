"""The MST-KD adaptor: projects the concatenated teacher embeddings into one common space.

SL: one linear layer; DuL: linear, LeakyReLU(0.01), linear; DLDPO: DuL with dropout 0.2 on
the hidden layer before the activation. The output is L2-normalized (the common hypersphere).
"""

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.losses import l2_normalize

KINDS = ("SL", "DuL", "DLDPO")


class Adaptor(nn.Module):
  """[B, G * D_teacher] teacher embeddings (concatenated in teacher order) -> [B, D] unit vectors."""
  kind: str = "SL"
  embedding_size: int = 512
  dropout: float = 0.2

  @nn.compact
  def __call__(self, teacher_embeddings, train: bool = False):
    if self.kind not in KINDS:
      raise ValueError(f"adaptor kind must be one of {KINDS}, got {self.kind!r}")
    x = teacher_embeddings.astype(jnp.float32)
    x = nn.Dense(self.embedding_size, name="fc1")(x)
    if self.kind != "SL":
      if self.kind == "DLDPO":
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.leaky_relu(x, negative_slope=0.01)
      x = nn.Dense(self.embedding_size, name="fc2")(x)
    return l2_normalize(x)
