r"""A specialized teacher: IResNet + ElasticArcFace trained on one demographic group.

COMMAND (CPU, seconds):
  python -m mstkd_jax.main --config=configs/teacher.py:smoke --workdir=/tmp/teacher
Other group, or any field:
  python -m mstkd_jax.main --config=configs/teacher.py --config.teacher.group=group_c
The paper's settings (real data prepared as TFDS data sets named bupt_balancedface and
rfw, see the README's "Real data"):
  python -m mstkd_jax.main --config=configs/teacher.py:bupt_iresnet34 \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.tfds.train=bupt_balancedface \
      --config.data.tfds.verification=rfw --config.teacher.group=African
"""

import ml_collections

from configs import common


def _teacher_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      group="group_a",          # train on this group's identities ...
      identities="",            # ... or on these comma-separated identity labels (balanced)
  ))


def default() -> ml_collections.ConfigDict:
  c = common.base()
  c.stage = "teacher"
  c.teacher = _teacher_section()
  c.train.update(batch_size=64, epochs=20.0, log_every=20, checkpoint_every=200)
  c.optim.lr_decay_epochs = (12, 16, 19)
  return c


def smoke() -> ml_collections.ConfigDict:
  c = default()
  c.data.synthetic = common.synthetic_data("smoke")
  c.train.update(batch_size=64, epochs=10.0, log_every=10, checkpoint_every=30)
  c.optim.lr_decay_epochs = (7, 9)
  return c


def tiny() -> ml_collections.ConfigDict:
  """The tests' teacher (seconds on one CPU device): 2 groups of 8 identities at 16x16, a
  width-4 IResNet-18, 4 epochs of batch 16."""
  c = default()
  c.data.synthetic = common.synthetic_data("tiny")
  c.model.update(width=4, embedding_size=16)
  c.train.update(batch_size=16, epochs=4.0, log_every=3, checkpoint_every=3)
  c.optim.lr_decay_epochs = (3,)
  c.num_devices = 1
  return c


def bupt_iresnet34() -> ml_collections.ConfigDict:
  c = common.bupt_iresnet34(default())
  c.teacher.group = "African"
  return c


def get_config(arg=None):
  return common.pick_preset(arg, {"default": default, "smoke": smoke, "tiny": tiny,
                                  "bupt_iresnet34": bupt_iresnet34}, __file__)
