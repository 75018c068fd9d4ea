"""Settings shared by every stage's config, and the preset/override helpers.

A config file is a program: `get_config(arg)` returns an ml_collections.ConfigDict, `arg`
picks a preset (`configs/teacher.py:smoke`). Any field can be overridden on the command
line with `--config.<field>=<value>`; unknown fields are refused.
"""

import ml_collections
from ml_collections import config_dict

from mstkd_jax.errors import UserError


def synthetic_data(scale: str = "default") -> ml_collections.ConfigDict:
  """The built-in synthetic demographic face set (see mstkd_jax/data/synthetic.py).

  `scale` is "default", "recipe" (configs/distill.py), "smoke" (configs/teacher.py:smoke) or
  "tiny" (2 groups at 16x16: the `tiny` presets the tests run).
  """
  # Groups, identities per group, images per identity, eval (test) identities per group,
  # eval images per identity, test pairs per group, image size, validation identities per
  # group, validation pairs per group (held out for checkpoint selection; 24 x 8 images
  # hold 672 same pairs, 300 need 150).
  sizes = {
      "tiny": (2, 8, 6, 6, 4, 40, 16, 0, 0),
      "smoke": (4, 32, 12, 24, 8, 200, 32, 0, 0),
      "recipe": (4, 48, 12, 48, 8, 600, 32, 24, 300),
      "default": (4, 96, 16, 48, 8, 600, 32, 24, 300),
  }[scale]
  return ml_collections.ConfigDict(dict(
      num_groups=sizes[0],
      identities_per_group=sizes[1],
      images_per_identity=sizes[2],
      eval_identities_per_group=sizes[3],
      eval_images_per_identity=sizes[4],
      pairs_per_group=sizes[5],
      image_size=sizes[6],
      difficulty=(),            # nuisance strength per group; () = the generator's default
      seed=0,
      validation_identities_per_group=sizes[7],  # 0 = no validation split
      validation_pairs_per_group=sizes[8],
  ))


def margin_head(name: str = "elastic_arcface", **fields) -> ml_collections.ConfigDict:
  """A margin head section; m and std left unset (None) take the head's standard values
  (mstkd_jax.losses.STANDARD_MARGINS: ElasticArcFace m 0.5 std 0.05, ElasticArcFace+ std
  0.0175, ElasticCosFace m 0.35 std 0.05, ElasticCosFace+ m 0.35 std 0.02, ArcFace 0.5,
  CosFace 0.35), so --config.head.name=... alone switches the margins with the loss.

  shard_classes=True splits the class centres over all devices (Partial FC's model
  parallelism, mstkd_jax/train/sharded_head.py; every training stage); sample_rate < 1 (with
  shard_classes) keeps, at each step, the classes of the batch and that fraction of the
  others (Partial FC v2). 1.0 = every class."""
  head = ml_collections.ConfigDict(dict(
      name=name, s=64.0, m=config_dict.placeholder(float),
      std=config_dict.placeholder(float), shard_classes=False, sample_rate=1.0))
  head.update(fields)
  return head


def backbone(name: str = "iresnet18", **fields) -> ml_collections.ConfigDict:
  """A model section: the arguments of models.create(name, ...) for a backbone (an IResNet
  by default; any registered backbone takes its own fields) and its compute dtype."""
  model = ml_collections.ConfigDict(dict(
      name=name, width=16, embedding_size=128, use_se=False, dtype="float32",
      # Before the embedding layer; unset (None) = the architecture's standard: 0.4 for
      # iresnet50 (the paper), 0 otherwise.
      dropout=config_dict.placeholder(float)))
  model.update(fields)
  return model


# The paper's backbone (the authors' released config): IResNet-34, 512-D embeddings, in
# bfloat16 on TPUs and GPUs and float32 on CPUs (dtype "auto": resolved once per run and
# recorded in each stage's config.json; the paper trained in mixed precision, fp16).
PAPER_BACKBONE = dict(name="iresnet34", width=64, embedding_size=512, dtype="auto")


def base() -> ml_collections.ConfigDict:
  """Fields every stage reads; stages add their own sections."""
  c = ml_collections.ConfigDict()
  c.stage = "teacher"
  c.seed = 0
  c.parallelism = "pmap"          # "pmap" or "shard_map" (jax.jit over a Mesh)
  c.num_devices = 0               # 0 = every device; n = the first n (single host)
  # Local folder of the memory-mapped caches (teacher embeddings, targets) and of the
  # compilation cache; "" = the workdir when it is local, else <temp dir>/mstkd_cache.
  c.cache_dir = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.data_dir = ""            # "" = <workdir>/data
  c.data.synthetic = synthetic_data()
  c.data.tfds = ml_collections.ConfigDict(dict(
      train="",                 # a face set made by `python -m mstkd_jax.formats.prepare`
      verification="",          # a verification set made the same way (RFW, .bin files)
      # Held-out validation pairs for checkpoint selection: another verification set
      # prepared the same way (--format=rfw|bin), never the verification (test) set;
      # "" = none.
      validation="",
      image_size=112,           # model input; stored images of another size are resized
  ))

  c.model = backbone()
  c.head = margin_head()
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.1,              # scaled by train.batch_size / 512
      head_base_lr=-1.0,        # < 0: same as base_lr
      momentum=0.9,
      weight_decay=5e-4,
      clip_norm=5.0,            # gradient-norm clipping of the backbone; 0 = off
      lr_decay_epochs=(8, 14, 20, 25),
      lr_decay_factor=0.1,
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128,           # global batch, over all hosts and devices
      epochs=26.0,
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,
      eval_batch_size=256,
      eval_every=0,             # steps between verification during training; 0 = off
      select="last",            # or "validation": the best state on the held-out split
  ))
  return c


# The authors' released scripts train on one GPU (world_size = 1) with batch 128: the LR is
# 0.1 x 128 / 512 = 0.025 (adaptor 1.0 x 128 / 512 = 0.25). On more devices raise the batch
# (--config.train.batch_size, per stage in configs/distill.py): the LR follows it linearly.
PAPER_BATCH = 128


def bupt_iresnet34(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's teacher recipe (the paper and the authors' released config) for a
  single-stage config: IResNet-34 at 112x112, ElasticArcFace, batch 128, 52 epochs with the
  LR x0.1 at 16, 28, 40, 50."""
  c.data.source = "tfds"        # --config.data.tfds.train=... --config.data.data_dir=...
  c.model.update(PAPER_BACKBONE)
  c.head = margin_head("elastic_arcface")
  c.optim.update(base_lr=0.1, lr_decay_epochs=(16, 28, 40, 50))
  c.train.update(batch_size=PAPER_BATCH, epochs=52.0, log_every=100, checkpoint_every=2000)
  return c


def pick_preset(arg: str | None, presets: dict, file: str) -> ml_collections.ConfigDict:
  """Calls the preset named by `arg` ("" or None = "default"); unknown names are refused."""
  name = arg or "default"
  if name not in presets:
    raise UserError(f"unknown preset {name!r} for {file}; expected one of {sorted(presets)}")
  config = presets[name]()
  config.preset = name
  return config
