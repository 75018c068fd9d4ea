"""Adaptor stage: learns the projection of the concatenated teacher embeddings into one space.

Trained with a margin head (ElasticArcFace in the paper) over all training identities on
the extraction stage's embeddings (the orientation of each example drawn like an image
flip); model selection keeps the epoch with the lowest mean training loss. Then it maps
every training image and its mirror to its target (targets.npy, [N, 2, D]), saves the
selected adaptor under model/, and the adaptor's space on every group's verification pairs.
The teacher embeddings are read memory-mapped and the targets written in chunks, so neither
has to fit in memory.

Config: seed, parallelism, num_devices, data, model.embedding_size, head (the adaptor's
margin head; head.shard_classes and head.sample_rate as the teacher's), optim, train,
adaptor.orientation and adaptor.model (the arguments of models.create("adaptor", ...):
kind, embedding_size, dropout).
Inputs: extract_dir (the extraction stage).
"""

import dataclasses
import functools

import jax
import numpy as np

from mstkd_jax import files, models, workdir as workdir_lib
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embed, target_space
from mstkd_jax.stages import common, extract
from mstkd_jax.train import build, loop, steps


def _apply_fn(adaptor):
  return jax.jit(lambda variables, x: adaptor.apply(variables, x, train=False))


def _map(apply, variables, embeddings, out, batch=4096):
  """Writes the adaptor outputs for [..., G, D] teacher embeddings (possibly memory-mapped)
  into out [..., D_out] (contiguous, e.g. a memory-mapped file), in chunks; returns out."""
  if not out.flags.c_contiguous:
    raise ValueError("the adaptor outputs need a contiguous array to fill")
  flat = embeddings.reshape((-1, embeddings.shape[-2] * embeddings.shape[-1]))
  rows = out.reshape((len(flat), out.shape[-1]))       # a view of out
  for i in range(0, len(flat), batch):
    rows[i:i + batch] = np.asarray(apply(variables, np.asarray(flat[i:i + batch])))
  return out


def _write_targets(config, workdir: str, apply, variables, train_embeddings, size_out: int
                   ) -> str:
  """Writes the cache targets.npy [N, 2, size_out] (the adaptor's outputs for every
  training image and its mirror) where this process writes caches; returns its path."""
  path = common.cache_file(config, workdir, common.TARGETS, make=True)
  if common.writes_caches(config, workdir):
    with files.npy_writer(path, (len(train_embeddings), 2, size_out)) as targets:
      _map(apply, variables, train_embeddings, targets)             # [N, 2, D]
  return path


def remake_caches(config, workdir: str, name: str = "adaptor",
                  inputs: common.Inputs = common.Inputs()) -> None:
  """Writes the cache targets.npy of the finished stage in `workdir` again, from its saved
  adaptor and the extraction's teacher embeddings (`inputs.extract_dir`), e.g. on another
  machine than the one that trained it, where the local cache is missing. Nothing in
  `workdir` changes; no training.

  Raises:
    UserError: the saved adaptor or the teacher embeddings are missing or do not fit.
  """
  train_embeddings, _ = extract.load(config, inputs.extract_dir)
  num, _, num_teachers, size = train_embeddings.shape
  network = config.adaptor.model.to_dict()
  adaptor = models.create("adaptor", **network)
  template = build.init_variables(adaptor, jax.random.PRNGKey(0),
                                  np.zeros((1, num_teachers * size), np.float32))
  variables = workdir_lib.load_model(workdir, {"params": template["params"]}, name)
  print(f"[{name}] remaking the targets of {num} images from the saved adaptor", flush=True)
  _write_targets(config, workdir, _apply_fn(adaptor), variables, train_embeddings,
                 network["embedding_size"])


def run(config, workdir: str, name: str = "adaptor", epochs_field: str = "train.epochs",
        inputs: common.Inputs = common.Inputs()) -> dict:
  """Trains the adaptor on the teacher embeddings in `inputs.extract_dir`, keeps its epoch
  of lowest mean training loss, and writes targets.npy and its space's verification
  embeddings. Returns {"verification", "best", "training", "diagnostics"}.

  Raises:
    UserError: the teacher embeddings are missing or cover another training set.
  """
  orientation = input_pipeline.check_orientation(
      config.adaptor.get("orientation", "as_fed"), "adaptor.orientation")
  run = common.StageRun.create(config, workdir, name, epochs_field)
  train_embeddings, verification = extract.load(config, inputs.extract_dir)  # memory-mapped
  labels = run.train_set.identity
  num, _, num_teachers, size = train_embeddings.shape
  if num != len(labels):
    raise UserError(f"the teacher embeddings in {inputs.extract_dir} cover {num} "
                    f"images, the training set has {len(labels)}; rerun the extraction")
  network = config.adaptor.model.to_dict()
  print(f"[{name}] {network['kind']} adaptor over {num_teachers} teachers x {size}-D, "
        f"{num} images of {run.train_set.num_identities} identities", flush=True)
  settings = run.settings(num, select_best_epoch=True)

  adaptor = models.create("adaptor", **network)
  head = models.create("margin_head", num_classes=run.train_set.num_identities)
  init_rng, head_rng = run.init_rngs()
  variables = build.init_variables(adaptor, init_rng,
                                   np.zeros((1, num_teachers * size), np.float32))
  head_vars = build.init_variables(
      head, head_rng, np.zeros((1, network["embedding_size"]), np.float32))
  init_state, tx, schedule = run.state(
      settings, {"backbone": variables["params"], "head": head_vars["params"]}, {},
      build.backbone_and_head_groups(config.optim))
  # head.shard_classes / head.sample_rate: the adaptor's head covers every training
  # identity, so it gains most from splitting its centres (train/sharded_head.py).
  parallel, classes = build.class_shards(config.head, run.parallel,
                                         run.train_set.num_identities)
  run = dataclasses.replace(run, parallel=parallel)
  step_fn = functools.partial(steps.classification_step, backbone=adaptor, head=head,
                              margin=build.margin_spec(config.head, shards_classes=True),
                              tx=tx, schedule=schedule, input_key="teacher_embeddings",
                              classes=classes)
  # Only labels go through tf.data; each batch reads its rows of the (memory-mapped)
  # embeddings in the orientation drawn for it, like an image flip.
  oriented = {"teacher_embeddings": train_embeddings.reshape(num, 2, num_teachers * size)}

  def batches(start):
    for batch in input_pipeline.train_batches({"label": labels}, start_step=start,
                                              **run.batch_plan(settings)):
      yield input_pipeline.add_oriented(batch, oriented, orientation)

  run.train(settings, init_state, step_fn, batches)

  best, info = loop.load_best(run.workdir, loop.best_variables(init_state))
  best = {"params": best["params"]["backbone"]}
  print(f"[{name}] selected epoch {info['epoch']} (mean training loss "
        f"{info['mean_loss']:.4f})", flush=True)
  apply = _apply_fn(adaptor)
  size_out = network["embedding_size"]
  space = {g: tuple(_map(apply, best, emb[:, k], np.empty((len(emb), size_out), np.float32))
                    for k in (0, 1)) + (same,)
           for g, (emb, same) in verification.items()}
  results = embed.evaluate_embeddings(space)
  print(f"[{name}] adaptor space verification accuracy: {embed.accuracy_line(results)}",
        flush=True)
  training = common.training_record(run.workdir, settings)
  workdir_lib.save_model(run.workdir, info["step"], best)  # every process takes part
  diagnostics = None
  path = _write_targets(config, run.workdir, apply, best, train_embeddings, size_out)
  if jax.process_index() == 0:
    embed.save_embeddings(run.workdir, space)
    diagnostics = target_space.space_statistics(
        np.load(path, mmap_mode="r")[:, 0], labels, run.train_set.group)
    common.warn_collapse(name, diagnostics)
  workdir_lib.write_results(run.workdir, name, info["step"], results,
                            {"training": training, "selected": info,
                             "diagnostics": {"targets": diagnostics}})
  return {"verification": results, "best": info, "training": training,
          "diagnostics": diagnostics}
