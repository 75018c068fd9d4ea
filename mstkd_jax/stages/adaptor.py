"""Adaptor stage: learns the projection of the concatenated teacher embeddings into one space.

Trained with a margin head over all training identities on the extraction's embeddings
(each example's orientation drawn like an image flip), keeping the epoch of lowest mean
training loss. Writes the cache targets.npy [N, 2, D] (every training image and its
mirror, in chunks: it need not fit in memory), model/ and the adaptor's space on every
group's verification pairs. `run_import` makes the same from an adaptor made elsewhere.
"""

import functools

import jax
import numpy as np

from mstkd_jax import files, models, workdir as workdir_lib
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding, target_space
from mstkd_jax.stages import extract, imported, shared
from mstkd_jax.train import build, loop, steps


def _apply_fn(adaptor):
  return jax.jit(lambda variables, x: adaptor.apply(variables, x, train=False))


def _map(apply, variables, embeddings, out, batch=4096):
  """Writes the adaptor outputs of teacher embeddings [..., sum D_g] (or [..., G, D]) into
  the contiguous out [..., D_out] (same leading axes) in chunks; returns out."""
  if not out.flags.c_contiguous:
    raise ValueError("the adaptor outputs need a contiguous array to fill")
  rows = out.reshape((-1, out.shape[-1]))               # a view of out
  flat = embeddings.reshape((len(rows), -1))
  for i in range(0, len(flat), batch):
    rows[i:i + batch] = np.asarray(apply(variables, np.asarray(flat[i:i + batch])))
  return out


def _write_targets(config, workdir: str, apply, variables, train_embeddings, size_out: int
                   ) -> str:
  """Writes the cache targets.npy [N, 2, size_out] where this process writes caches;
  returns its path."""
  path = shared.cache_file(config, workdir, shared.TARGETS, make=True)
  if shared.writes_caches(config, workdir):
    with files.npy_writer(path, (len(train_embeddings), 2, size_out)) as targets:
      _map(apply, variables, train_embeddings, targets)             # [N, 2, D]
  return path


def _teacher_embeddings(config, extract_dir: str, num_examples: int | None = None):
  """(training [N, 2, sum D_g] memory-mapped, verification as extract.load, sum D_g);
  UserError where N is not `num_examples`."""
  train_embeddings, verification = extract.load(config, extract_dir)
  num = len(train_embeddings)
  if num_examples is not None and num != num_examples:
    raise UserError(f"the teacher embeddings in {extract_dir} cover {num} images, the "
                    f"training set has {num_examples}; rerun the extraction")
  input_size = int(np.prod(train_embeddings.shape[2:]))
  return train_embeddings.reshape(num, 2, input_size), verification, input_size


def remake_caches(config, workdir: str, name: str = "adaptor",
                  inputs: shared.Inputs = shared.Inputs()) -> None:
  """Writes targets.npy of the finished stage in `workdir` again from its saved adaptor
  (e.g. on another machine, where the local cache is missing); no training.

  Raises:
    UserError: the saved adaptor or the teacher embeddings are missing or do not fit.
  """
  train_embeddings, _, input_size = _teacher_embeddings(config, inputs.extract_dir)
  adaptor = models.create("adaptor", **config.model.to_dict())
  variables = workdir_lib.load_model(workdir, shared.adaptor_template(adaptor, input_size),
                                     name)
  print(f"[{name}] remaking the targets of {len(train_embeddings)} images from the saved "
        "adaptor", flush=True)
  _write_targets(config, workdir, _apply_fn(adaptor), variables, train_embeddings,
                 config.model.embedding_size)


def run(config, workdir: str, name: str = "adaptor", inputs: shared.Inputs = shared.Inputs()
        ) -> dict:
  """Trains the adaptor on the teacher embeddings in `inputs.extract_dir`; returns
  {"verification", "best", "training", "diagnostics"}.

  Raises:
    UserError: the teacher embeddings are missing or cover another training set.
  """
  orientation = input_pipeline.check_orientation(
      config.adaptor.get("orientation", "as_fed"), "adaptor.orientation")
  stage = shared.StageRun.create(config, workdir, name, "adaptor")
  train_embeddings, verification, input_size = _teacher_embeddings(
      config, inputs.extract_dir, stage.train_set.num_examples)
  labels = stage.train_set.identity
  num, num_identities = len(labels), stage.train_set.num_identities
  network = config.model.to_dict()
  print(f"[{name}] {network['kind']} adaptor over {input_size}-D concatenated teacher "
        f"embeddings, {num} images of {num_identities} identities", flush=True)
  settings = stage.settings(num, select_best_epoch=True)

  adaptor = models.create("adaptor", **network)
  init_rng, head_rng = stage.init_rngs()
  variables = build.init_variables(adaptor, init_rng, np.zeros((1, input_size), np.float32))
  head, head_params = shared.margin_head(num_identities, head_rng, network["embedding_size"])
  init_state, tx, schedule = stage.state(
      settings, {"backbone": variables["params"], "head": head_params}, {},
      build.backbone_and_head_groups(config.optim))
  stage, classes, margin = stage.with_class_shards(num_identities)
  step_fn = functools.partial(steps.classification_step, backbone=adaptor, head=head,
                              margin=margin, tx=tx, schedule=schedule,
                              input_key="teacher_embeddings", classes=classes)
  # Only labels go through tf.data; each batch reads its rows of the (memory-mapped)
  # embeddings in the orientation drawn for it.
  oriented = {"teacher_embeddings": train_embeddings}

  def batches(start):
    for batch in input_pipeline.train_batches({"label": labels}, start_step=start,
                                              **stage.batch_plan(settings)):
      yield input_pipeline.add_oriented(batch, oriented, orientation)

  stage.train(settings, init_state, step_fn, batches)

  best, info = loop.load_best(stage.workdir, loop.best_variables(init_state))
  best = {"params": best["params"]["backbone"]}
  print(f"[{name}] selected epoch {info['epoch']} (mean training loss "
        f"{info['mean_loss']:.4f})", flush=True)
  training = shared.training_record(stage.workdir, settings)
  return _finish(stage, adaptor, best, info["step"], train_embeddings, verification,
                 {"training": training, "selected": info}) | {"best": info}


def run_import(config, workdir: str, name: str = "adaptor",
               inputs: shared.Inputs = shared.Inputs(),
               field: str = "adaptor.checkpoints") -> dict:
  """Imports the adaptor in `inputs.checkpoint` (imported.load_adaptor) into config.model's
  network and writes what `run` writes. Returns {"verification", "training": None,
  "diagnostics", "imported"}.

  Raises:
    UserError: the teacher embeddings are missing or cover another training set, or the
      checkpoint cannot be read or does not fit (`field` names the config field).
  """
  stage = shared.StageRun.create(config, workdir, name, "adaptor")
  train_embeddings, verification, input_size = _teacher_embeddings(
      config, inputs.extract_dir, stage.train_set.num_examples)
  adaptor = models.create("adaptor", **config.model.to_dict())
  variables, record = imported.load_adaptor(inputs.checkpoint,
                                            shared.adaptor_template(adaptor, input_size),
                                            config.model.kind, field)
  print(f"[{name}] imported {inputs.checkpoint} ({record['format']}); no training",
        flush=True)
  return _finish(stage, adaptor, variables, record["step"] or 0, train_embeddings,
                 verification, {"imported": record}) | {"imported": record}


def _finish(stage: shared.StageRun, adaptor, variables: dict, step: int, train_embeddings,
            verification: dict, record: dict) -> dict:
  """Writes the adaptor's outputs and results.json (with `record`); returns
  {"verification", "training", "diagnostics"}."""
  apply = _apply_fn(adaptor)
  size_out = stage.config.model.embedding_size
  space = {g: tuple(_map(apply, variables, emb[:, k],
                         np.empty((len(emb), size_out), np.float32)) for k in (0, 1)) + (same,)
           for g, (emb, same) in verification.items()}
  results = embedding.evaluate_embeddings(space)
  print(f"[{stage.name}] adaptor space verification accuracy: {embedding.accuracy_line(results)}",
        flush=True)
  workdir_lib.save_model(stage.workdir, step, variables)  # every process takes part
  diagnostics = None
  path = _write_targets(stage.config, stage.workdir, apply, variables, train_embeddings, size_out)
  if jax.process_index() == 0:
    embedding.save_embeddings(stage.workdir, space)
    diagnostics = target_space.space_statistics(
        np.load(path, mmap_mode="r")[:, 0], stage.train_set.identity, stage.train_set.group)
    shared.warn_collapse(stage.name, diagnostics)
  workdir_lib.write_results(stage.workdir, stage.name, step, results,
                            {**record, "diagnostics": {"targets": diagnostics}})
  return {"verification": results, "training": record.get("training"),
          "diagnostics": diagnostics}
