"""MST-KD (Multiple Specialized Teachers Knowledge Distillation) in JAX/Flax.

Importing the package sets, where the user has not, what TensorFlow reads once when it
loads (tf.data, TFDS and clu's TensorBoard writer load it on first use, after this):
- TF_CPP_MIN_LOG_LEVEL=3: TensorFlow's C++ log lines (start-up notes such as the CPU
  feature guard, tf.data's) stay off stderr; its errors still reach us as Python
  exceptions, which we report in one line.
- TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's oneDNN kernels stay off. TensorFlow turns them on
  by itself only on newer x86 CPUs (AVX-512 with VNNI or BF16, AMX), where they also print
  a note at import that TF_CPP_MIN_LOG_LEVEL does not silence. Nothing we compute needs
  them: TensorFlow only decodes, gathers, flips, casts, scales and resizes input images (the
  model runs in XLA), and those give the same bits with oneDNN on or off (a test checks).
Set either variable before the import to choose otherwise.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
