"""Adaptor stage: learns the projection of the concatenated teacher embeddings into one space.

Trained with a margin head (ElasticArcFace in the paper) over all training identities on
the extraction stage's embeddings (the orientation of each example drawn like an image
flip); model selection keeps the epoch with the lowest mean training loss. Then it maps
every training image and its mirror to its target (targets.npy, [N, 2, D]), saves the
selected adaptor under model/, and the adaptor's space on every group's verification pairs.
The teacher embeddings are read memory-mapped and the targets written in chunks, so neither
has to fit in memory.
"""

import dataclasses
import functools
import os

import jax
import numpy as np

from mstkd_jax import models
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import target_space
from mstkd_jax.stages import extract, runtime
from mstkd_jax.train import loop, parallel as parallel_lib, state as state_lib, steps


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


def run(config, workdir: str, name: str = "adaptor", epochs_field: str = "train.epochs") -> dict:
  workdir = runtime.prepare_workdir(config, workdir)
  train_embeddings, verification = extract.load(config.adaptor.extract_dir)  # memory-mapped
  train_set = sources.training_set(config.data, workdir)
  labels = train_set.identity
  num, _, num_teachers, size = train_embeddings.shape
  orientation = input_pipeline.check_orientation(
      config.adaptor.get("orientation", "as_fed"), "adaptor.orientation")
  if num != len(labels):
    raise UserError(f"the teacher embeddings in {config.adaptor.extract_dir} cover {num} "
                    f"images, the training set has {len(labels)}; rerun the extraction")
  print(f"[{name}] {config.adaptor.kind} adaptor over {num_teachers} teachers x {size}-D, "
        f"{num} images of {train_set.num_identities} identities", flush=True)
  parallel = parallel_lib.get(config.parallelism, config.num_devices)
  input_pipeline.check_batch_split(config.train.batch_size, parallel.device_count,
                                   jax.process_count())
  settings = runtime.loop_settings(config, name, num, epochs_field)
  settings = dataclasses.replace(settings, select_best_epoch=True)
  adaptor = models.create("adaptor", kind=config.adaptor.kind,
                          embedding_size=config.adaptor.embedding_size,
                          dropout=config.adaptor.dropout)
  head = models.create("margin_head", num_classes=train_set.num_identities)
  init_rng, head_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = runtime.init_variables(adaptor, init_rng,
                                     np.zeros((1, num_teachers * size), np.float32))
  head_vars = runtime.init_variables(
      head, head_rng, np.zeros((1, config.adaptor.embedding_size), np.float32))
  tx, schedule = runtime.optimiser(
      config.optim, global_batch=config.train.batch_size,
      steps_per_epoch=settings.steps_per_epoch,
      groups=runtime.backbone_and_head_groups(config.optim))
  init_state = jax.tree.map(np.asarray, state_lib.create_state(
      {"backbone": variables["params"], "head": head_vars["params"]}, {}, tx))
  step_fn = functools.partial(steps.classification_step, backbone=adaptor, head=head,
                              margin=runtime.margin_spec(config.head), tx=tx,
                              schedule=schedule, input_key="teacher_embeddings")
  # Only labels go through tf.data; each batch reads its rows of the (memory-mapped)
  # embeddings in the orientation drawn for it, like an image flip.
  oriented = {"teacher_embeddings": train_embeddings.reshape(num, 2, num_teachers * size)}
  settings_in = dict(global_batch=config.train.batch_size,
                     steps_per_epoch=settings.steps_per_epoch, seed=config.seed,
                     total_steps=settings.total_steps,
                     local_device_count=parallel.local_device_count)

  def batches(start):
    for batch in input_pipeline.train_batches({"label": labels}, start_step=start,
                                              **settings_in):
      yield input_pipeline.add_oriented(batch, oriented, orientation)

  loop.train(workdir=workdir, settings=settings, init_state=init_state, step_fn=step_fn,
             batches=batches, parallel=parallel,
             rng=jax.random.PRNGKey(config.seed + 1))

  best, info = loop.load_best(workdir, loop.best_variables(init_state))
  best = {"params": best["params"]["backbone"]}
  print(f"[{name}] selected epoch {info['epoch']} (mean training loss "
        f"{info['mean_loss']:.4f})", flush=True)
  apply = _apply_fn(adaptor)
  size_out = config.adaptor.embedding_size
  space = {g: tuple(_map(apply, best, emb[:, k], np.empty((len(emb), size_out), np.float32))
                    for k in (0, 1)) + (same,)
           for g, (emb, same) in verification.items()}
  results = runtime.evaluate_embeddings(space)
  print(f"[{name}] adaptor space verification accuracy: {runtime.accuracy_line(results)}",
        flush=True)
  training = runtime.training_record(workdir, settings)
  runtime.save_model(workdir, info["step"], best)  # Orbax: every process takes part.
  diagnostics = None
  if jax.process_index() == 0:
    path = os.path.join(workdir, "targets.npy")
    with runtime.npy_writer(path, (num, 2, size_out)) as targets:
      _map(apply, best, train_embeddings, targets)                   # [N, 2, D]
    runtime.save_embeddings(workdir, space)
    diagnostics = target_space.space_statistics(
        np.load(path, mmap_mode="r")[:, 0], labels, train_set.group)
    runtime.warn_collapse(name, diagnostics)
  runtime.write_results(workdir, name, info["step"], results,
                        {"training": training, "selected": info,
                         "diagnostics": {"targets": diagnostics}})
  return {"verification": results, "best": info, "training": training,
          "diagnostics": diagnostics}
