"""Adaptor stage: learns the projection of the concatenated teacher embeddings into one space.

Trained with a margin head (ElasticArcFace in the paper) over all training identities on
the extraction stage's embeddings (the orientation of each example drawn like an image
flip); model selection keeps the epoch with the lowest mean training loss. Then it maps
every training image and its mirror to its target (targets.npy, [N, 2, D]), saves the
selected adaptor under model/, and the adaptor's space on every group's verification pairs.
"""

import dataclasses
import functools
import os

import jax
import numpy as np

from mstkd_jax import models
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.stages import extract, runtime
from mstkd_jax.train import loop, parallel as parallel_lib, state as state_lib, steps


def _apply_fn(adaptor):
  return jax.jit(lambda variables, x: adaptor.apply(variables, x, train=False))


def _map(apply, variables, embeddings, batch=4096):
  """Adaptor outputs for [..., G, D] teacher embeddings -> [..., D_out], in chunks."""
  lead = embeddings.shape[:-2]
  flat = embeddings.reshape((-1, embeddings.shape[-2] * embeddings.shape[-1]))
  out = [np.asarray(apply(variables, flat[i:i + batch])) for i in range(0, len(flat), batch)]
  return np.concatenate(out).reshape(lead + (-1,))


def run(config, workdir: str, name: str = "adaptor") -> dict:
  workdir = runtime.prepare_workdir(config, workdir)
  train_embeddings, verification = extract.load(config.adaptor.extract_dir)
  train_set = sources.training_set(config.data, workdir)
  labels = train_set.identity
  num, _, num_teachers, size = train_embeddings.shape
  print(f"[{name}] {config.adaptor.kind} adaptor over {num_teachers} teachers x {size}-D, "
        f"{num} images of {train_set.num_identities} identities", flush=True)
  parallel = parallel_lib.get(config.parallelism, config.num_devices)
  input_pipeline.check_batch_split(config.train.batch_size, parallel.device_count,
                                   jax.process_count())
  settings = runtime.loop_settings(config, name, num)
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
  arrays = {"teacher_embeddings": train_embeddings.reshape(num, 2, num_teachers * size),
            "label": labels}
  batches = functools.partial(
      input_pipeline.train_batches, arrays, global_batch=config.train.batch_size,
      steps_per_epoch=settings.steps_per_epoch, seed=config.seed,
      total_steps=settings.total_steps, local_device_count=parallel.local_device_count,
      oriented=("teacher_embeddings",))
  loop.train(workdir=workdir, settings=settings, init_state=init_state, step_fn=step_fn,
             batches=lambda start: batches(start_step=start), parallel=parallel,
             rng=jax.random.PRNGKey(config.seed + 1))

  best, info = loop.load_best(workdir, loop.best_variables(init_state))
  best = {"params": best["params"]["backbone"]}
  print(f"[{name}] selected epoch {info['epoch']} (mean training loss "
        f"{info['mean_loss']:.4f})", flush=True)
  apply = _apply_fn(adaptor)
  targets = _map(apply, best, train_embeddings)                        # [N, 2, D]
  space = {g: (_map(apply, best, emb[:, 0]), _map(apply, best, emb[:, 1]), same)
           for g, (emb, same) in verification.items()}
  results = runtime.evaluate_embeddings(space)
  print(f"[{name}] adaptor space verification accuracy: {runtime.accuracy_line(results)}",
        flush=True)
  runtime.save_model(workdir, info["step"], best)  # Orbax: every process takes part.
  if jax.process_index() == 0:
    runtime.atomic_save_npy(os.path.join(workdir, "targets.npy"), targets.astype(np.float32))
    runtime.save_embeddings(workdir, space)
  return {"verification": results, "best": info}
