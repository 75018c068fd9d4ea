"""Margin head: the class centres of a margin-based classifier (ArcFace family).

The module only holds the centres and returns cosine similarities; the margins are pure
functions in `mstkd_jax.losses`.
"""

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.losses import l2_normalize


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
    cos = l2_normalize(embeddings) @ l2_normalize(kernel, axis=0)
    return jnp.clip(cos, -1.0, 1.0)
