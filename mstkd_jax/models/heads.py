"""Margin head: the class centres of a margin-based classifier (ArcFace family).

The module only holds the centres and returns cosine similarities; the margins are pure
functions in `mstkd_jax.losses`. `cosines` is the same computation on a given kernel, used
by the class-sharded head (`mstkd_jax.train.sharded_head`), whose kernel is one device's
block of columns.
"""

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.losses import l2_normalize


def cosines(embeddings, kernel):
  """Cosine similarities [B, C'] of embeddings [B, D] and class centres kernel [D, C'].

  Both are L2-normalized (embeddings per row, centres per column) in float32, and the
  product is clipped to [-1, 1]. Each column is normalized on its own, so a block of
  columns gives exactly those columns of the full product's cosines.
  """
  cos = l2_normalize(embeddings) @ l2_normalize(kernel, axis=0)
  return jnp.clip(cos, -1.0, 1.0)


class MarginHead(nn.Module):
  """Cosine similarities [B, num_classes] between embeddings and class centres, float32.

  The centres (`kernel`, [embedding_size, num_classes]) are initialised N(0, 0.01) as in
  the authors' ElasticFace heads.
  """
  num_classes: int

  @nn.compact
  def __call__(self, embeddings):
    kernel = self.param("kernel", nn.initializers.normal(stddev=0.01),
                        (embeddings.shape[-1], self.num_classes), jnp.float32)
    return cosines(embeddings, kernel)
