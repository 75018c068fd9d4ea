r"""The whole MST-KD recipe: specialized and balanced teachers, extraction, adaptors,
students (a-KD, EAF-KD), the student alone, and the fairness report.

COMMAND (CPU, the built-in synthetic set, about 10 minutes on 2 cores):
  python -m mstkd_jax.main --config=configs/distill.py
Every stage, tiny (seconds each; `:tiny` is the same on one device, as the tests run it):
  python -m mstkd_jax.main --config=configs/distill.py:smoke --workdir=/tmp/mstkd
Every variant (SL, DuL, DLDPO x a-KD, EAF-KD x specialized, balanced):
  python -m mstkd_jax.main --config=configs/distill.py:full
One stage, or rerun a stage and everything after it:
  ... --config.only=adaptor/specialized/SL      ... --config.force=teacher/group_b
"""

import ml_collections

from configs import common


def _recipe(epochs: float, batch_size: int, base_lr: float, decay_epochs, clip_norm=5.0):
  return ml_collections.ConfigDict(dict(
      train=dict(batch_size=batch_size, epochs=epochs, log_every=20, checkpoint_every=200,
                 keep_checkpoints=2, eval_batch_size=256, eval_every=0, select="last"),
      optim=dict(base_lr=base_lr, head_base_lr=-1.0, momentum=0.9, weight_decay=5e-4,
                 clip_norm=clip_norm, lr_decay_epochs=tuple(decay_epochs),
                 lr_decay_factor=0.1),
  ))


def _adaptor_head() -> ml_collections.ConfigDict:
  # The released adaptor script builds its ElasticArcFace from s and m only, so the margin
  # std is that class's default, 0.0125 (teachers and students: 0.05). Its gradient norm is
  # clipped at 5 like a backbone's (the _recipe default).
  return common.margin_head("elastic_arcface", std=0.0125)


def default() -> ml_collections.ConfigDict:
  c = common.base()
  # Each stage trains with its own section's train and optim (below): the single-stage
  # defaults would be fields nothing reads, so they are not offered.
  del c["train"], c["optim"]
  c.stage = "pipeline"
  c.data.synthetic = common.synthetic_data("recipe")
  # Milder nuisance than the generator's default ramp (0.85..1.2), still unequal across
  # groups: the CPU budget of this preset trains each network for only ~100 steps.
  c.data.synthetic.difficulty = (0.5, 0.65, 0.8, 0.95)
  c.teacher_sets = ("specialized", "balanced")
  c.adaptors = ("SL",)                  # any of SL, DuL, DLDPO
  # Any of a-KD, EAF-KD; EAF-KD too in :full (two more students do not fit the 10 minutes).
  c.kd_losses = ("a-KD",)
  c.student_alone = True
  c.seeds = 1                           # N > 1: the recipe once per training seed, combined
  c.targets = "cached"                  # or "online": frozen teachers + adaptor in the step
  # Teacher embeddings and targets of a mirrored training image: "as_fed" (the mirror's own)
  # or "stored" (the stored image's, as the authors' released scripts; README).
  c.target_orientation = "as_fed"
  c.balanced_seed = 0                   # the random identity split of the balanced teachers
  c.only = ""                           # run just this stage (its inputs must exist)
  c.force = ""                          # rerun this stage and everything downstream
  # Sized so that every stage converges (train/convergence.py) within the 10-minute budget
  # of 2 CPU cores: 8-wide IResNet-18s (about 500 img/s training here, 3x the 16-wide), 16
  # teacher epochs (at 12 the hardest group's teacher stopped at 0.69 training accuracy),
  # 9 student epochs (at 8 the student alone stopped at 0.797).
  c.model.width = 8
  c.teacher = _recipe(epochs=16.0, batch_size=64, base_lr=0.1, decay_epochs=(12, 15))
  c.adaptor = _recipe(epochs=100.0, batch_size=128, base_lr=1.0, decay_epochs=(55, 80, 95))
  c.adaptor.train.log_every = 300
  c.adaptor.update(dict(embedding_size=c.model.embedding_size, dropout=0.2,
                        head=_adaptor_head()))
  c.student = _recipe(epochs=9.0, batch_size=64, base_lr=0.1, decay_epochs=(7, 9))
  c.student.kd_weight = 10000.0
  return c


def smoke() -> ml_collections.ConfigDict:
  """Every stage, tiny: 2 groups of 8 identities at 16x16, width-4 nets, 2 epochs each."""
  c = default()
  c.data.synthetic = common.synthetic_data("tiny")
  c.model.update(width=4, embedding_size=16)
  c.adaptor.embedding_size = 16
  c.kd_losses = ("a-KD",)
  for section in (c.teacher, c.adaptor, c.student):
    section.train.update(batch_size=16, epochs=2.0, log_every=5, checkpoint_every=100)
    section.optim.lr_decay_epochs = (2,)
  # Adaptor steps cost next to nothing: train it to convergence even here (6 steps an
  # epoch). The networks stay tiny and unconverged (a plumbing check: they warn).
  c.adaptor.train.update(epochs=60.0, log_every=60)
  c.adaptor.optim.lr_decay_epochs = (30, 45, 55)
  return c


def tiny() -> ml_collections.ConfigDict:
  """`smoke` on one device, whatever the machine has: the size the tests (and the notebook's
  test run) train."""
  c = smoke()
  c.num_devices = 1
  return c


def full() -> ml_collections.ConfigDict:
  c = default()
  c.adaptors = ("SL", "DuL", "DLDPO")
  c.kd_losses = ("a-KD", "EAF-KD")
  return c


def bupt_iresnet34() -> ml_collections.ConfigDict:
  """The paper's settings (METHOD.md and the authors' released config: batch 128 on one GPU,
  see configs/common.py); the data set comes by override (see README)."""
  c = common.bupt_iresnet34(default())
  batch = common.PAPER_BATCH
  c.teacher = _recipe(epochs=52.0, batch_size=batch, base_lr=0.1, decay_epochs=(16, 28, 40, 50))
  c.student = _recipe(epochs=52.0, batch_size=batch, base_lr=0.1, decay_epochs=(16, 28, 40, 50))
  c.student.kd_weight = 10000.0
  # METHOD.md: the adaptor trains 26 epochs, LR x0.1 at 8, 14, 20, 25.
  c.adaptor = _recipe(epochs=26.0, batch_size=batch, base_lr=1.0, decay_epochs=(8, 14, 20, 25))
  c.adaptor.update(dict(embedding_size=512, dropout=0.2, head=_adaptor_head()))
  for section in (c.teacher, c.adaptor, c.student):
    section.train.update(log_every=100, checkpoint_every=2000)
  c.adaptors = ("SL", "DuL", "DLDPO")
  c.kd_losses = ("a-KD", "EAF-KD")
  c.target_orientation = "stored"       # as the released scripts
  return c


def get_config(arg=None):
  return common.pick_preset(arg, {"default": default, "smoke": smoke, "tiny": tiny,
                                  "full": full, "bupt_iresnet34": bupt_iresnet34}, __file__)
