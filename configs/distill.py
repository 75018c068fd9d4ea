r"""The whole MST-KD recipe: specialized and balanced teachers, extraction, adaptors,
students (a-KD, EAF-KD), the student alone, and the fairness report.

COMMAND (CPU, the built-in synthetic set, about 10 minutes on 2 cores):
  python -m mstkd_jax.main --config=configs/distill.py
Every stage, tiny (seconds each; `:tiny` is the same on one device, as the tests run it):
  python -m mstkd_jax.main --config=configs/distill.py:smoke --workdir=/tmp/mstkd
Every variant (SL, DuL, DLDPO x a-KD, EAF-KD x specialized, balanced):
  python -m mstkd_jax.main --config=configs/distill.py:full
Teachers wider than the student, distilled with MSE and with cosine, over 3 seeds:
  python -m mstkd_jax.main --config=configs/distill.py:wide_teachers
One stage, or rerun a stage and everything after it:
  ... --config.only=adaptor/specialized/SL      ... --config.force=teacher/group_b
Teachers (and adaptors) made before, imported instead of trained (README, "The recipe"):
  ... --config.teacher.checkpoints=OLD_WORKDIR/teacher \
      --config.teacher.balanced_checkpoints=OLD_WORKDIR/balanced_teacher

Each role has its own section, with its own network: `teacher`, `adaptor` and `student`
each hold model, head, train and optim (the student also kd), so teachers and student may
be different networks (`teacher.models` gives single teachers another one).
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


def _teacher(c: ml_collections.ConfigDict, **model) -> None:
  c.teacher.update(dict(
      model=common.backbone(**model), head=common.margin_head(),
      # Folders of teachers made before, one entry per group (balanced: per part 0..G-1),
      # named after it: a stage folder of an earlier run (e.g. OLD_WORKDIR/teacher) or a
      # <group>.pth / .pt IResNet state_dict. "" = train them.
      checkpoints="", balanced_checkpoints="",
      # Teachers whose network differs from teacher.model: {teacher stage name, e.g.
      # "teacher/group_a": its model fields (the changed ones; all of them for another
      # model name)}.
      models=ml_collections.ConfigDict()))


def _adaptor(c: ml_collections.ConfigDict, embedding_size: int) -> None:
  c.adaptor.update(dict(
      # The adaptor network but its kind (the `adaptors` field picks the kinds).
      model=dict(embedding_size=embedding_size, dropout=0.2), head=_adaptor_head(),
      # Adaptors made before, per teacher set: one entry per kind (SL, DuL, DLDPO) named
      # after it: an adaptor stage folder (e.g. OLD_WORKDIR/adaptor/specialized) or the
      # authors' <kind>.pth. "" = train them.
      checkpoints="", balanced_checkpoints=""))


def _student(c: ml_collections.ConfigDict, **model) -> None:
  # kd.weight: the KD term's weight for every KD student; which distances and whether the
  # margin head trains too are the recipe's kd_distances and kd_losses.
  c.student.update(dict(model=common.backbone(**model), head=common.margin_head(),
                        kd=dict(weight=10000.0)))


def default() -> ml_collections.ConfigDict:
  c = common.base()
  # Each role trains its own network with its own section's fields (below): the
  # single-stage fields would be fields nothing reads, so they are not offered.
  for key in ("model", "head", "train", "optim"):
    del c[key]
  c.stage = "pipeline"
  c.data.synthetic = common.synthetic_data("recipe")
  # Milder nuisance than the generator's default ramp (0.85..1.2), still unequal across
  # groups: the CPU budget of this preset trains each network for only ~100 steps.
  c.data.synthetic.difficulty = (0.5, 0.65, 0.8, 0.95)
  c.teacher_sets = ("specialized", "balanced")
  c.adaptors = ("SL",)                  # any of SL, DuL, DLDPO
  # The KD students: the paper's a-KD (the KD term alone) and EAF-KD (with the margin
  # head's loss), EAF-KD too in :full (two more students do not fit the 10 minutes) ...
  c.kd_losses = ("a-KD",)
  # ... each with these distances (losses.KD_DISTANCES: "mse", the paper's, or "cosine").
  c.kd_distances = ("mse",)
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
  c.teacher = _recipe(epochs=16.0, batch_size=64, base_lr=0.1, decay_epochs=(12, 15))
  _teacher(c, width=8)
  c.adaptor = _recipe(epochs=100.0, batch_size=128, base_lr=1.0, decay_epochs=(55, 80, 95))
  c.adaptor.train.log_every = 300
  _adaptor(c, embedding_size=128)
  c.student = _recipe(epochs=9.0, batch_size=64, base_lr=0.1, decay_epochs=(7, 9))
  _student(c, width=8)
  return c


def smoke() -> ml_collections.ConfigDict:
  """Every stage, tiny: 2 groups of 8 identities at 16x16, width-4 nets, 2 epochs each."""
  c = default()
  c.data.synthetic = common.synthetic_data("tiny")
  for section in (c.teacher, c.student):
    section.model.update(width=4, embedding_size=16)
  c.adaptor.model.embedding_size = 16
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


def wide_teachers() -> ml_collections.ConfigDict:
  """Teachers twice as wide as the student (16-wide IResNet-18s into the 8-wide one), each
  KD student distilled with the paper's MSE and with cosine (the same weight, 10,000: for
  unit vectors ||t - s||^2 = 2 - 2 cos, so at one weight the cosine term is D/2 = 64 times
  the MSE one), the student alone, over 3 seeds."""
  c = default()
  c.teacher.model.width = 16
  c.kd_distances = ("mse", "cosine")
  c.seeds = 3
  return c


def bupt_iresnet34() -> ml_collections.ConfigDict:
  """The paper's settings (the paper and the authors' released config: batch 128 on one
  GPU, see configs/common.py); the data set comes by override (see README)."""
  c = default()
  c.data.source = "tfds"        # --config.data.tfds.train=... --config.data.data_dir=...
  batch = common.PAPER_BATCH
  c.teacher = _recipe(epochs=52.0, batch_size=batch, base_lr=0.1, decay_epochs=(16, 28, 40, 50))
  _teacher(c, **common.PAPER_BACKBONE)
  c.student = _recipe(epochs=52.0, batch_size=batch, base_lr=0.1, decay_epochs=(16, 28, 40, 50))
  _student(c, **common.PAPER_BACKBONE)
  # The paper: the adaptor trains 26 epochs, LR x0.1 at 8, 14, 20, 25.
  c.adaptor = _recipe(epochs=26.0, batch_size=batch, base_lr=1.0, decay_epochs=(8, 14, 20, 25))
  _adaptor(c, embedding_size=512)
  for section in (c.teacher, c.adaptor, c.student):
    section.train.update(log_every=100, checkpoint_every=2000)
  c.adaptors = ("SL", "DuL", "DLDPO")
  c.kd_losses = ("a-KD", "EAF-KD")
  c.target_orientation = "stored"       # as the released scripts
  return c


def get_config(arg=None):
  return common.pick_preset(arg, {"default": default, "smoke": smoke, "tiny": tiny,
                                  "full": full, "wide_teachers": wide_teachers,
                                  "bupt_iresnet34": bupt_iresnet34}, __file__)
