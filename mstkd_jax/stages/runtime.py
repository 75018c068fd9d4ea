"""What every stage does around the loop: check the workdir, build models and optimiser from
the config, embed images, evaluate verification pairs.

Configs are read here and in the stage files only; models, losses and steps take plain values.
"""

import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mstkd_jax import losses, models, paths
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import target_space, verification
from mstkd_jax.models import iresnet
from mstkd_jax.train import convergence, loop, parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.train.checkpoints import Checkpoints, flat_shapes, shape_mismatches

# Fields that steer how a run is carried out but not what it computes: they may change
# between a run and its resumption.
RUN_CONTROL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                      "train.eval_batch_size", "train.eval_every", "parallelism", "num_devices", "data.data_dir",
                      "only", "force", "extract.teacher_dirs", "student.teacher_dirs",
                      "student.adaptor_dir", "adaptor.extract_dir")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def flatten(tree, prefix="") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_dict(config) -> dict:
  """The config as JSON-compatible nested dicts (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


def changed_fields(old: dict, new: dict, ignore=RUN_CONTROL_FIELDS) -> list[str]:
  old_flat, new_flat = flatten(old), flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [f"{k}: {old_flat.get(k, '<absent>')!r} -> {new_flat.get(k, '<absent>')!r}"
          for k in keys if old_flat.get(k) != new_flat.get(k)
          and not any(k == f or k.startswith(f + ".") for f in ignore)]


def prepare_workdir(config, workdir: str, refuse_changes: bool = True) -> str:
  """Creates `workdir`, refuses one holding a run of another config, writes config.json.

  With refuse_changes=False (the pipeline's root, whose stages check their own configs)
  config.json just records the latest run. Returns the absolute workdir; only process 0
  writes.
  """
  workdir = paths.local(workdir, "workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    # Named per process and host: the processes of a multi-host run share the workdir.
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"the workdir {workdir} cannot be written: {e.strerror or e}") from e
  if jax.process_count() > 1:
    _check_shared(workdir)
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if refuse_changes and os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} is not a readable config.json ({e}); move it away or use "
                      "another --workdir") from e
    changes = changed_fields(old, new)
    if changes:
      raise UserError(
          f"{workdir} holds a run of another config (its config.json differs in: "
          + "; ".join(changes) + "). Use another --workdir, or the same settings to resume.")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return workdir


def _check_shared(workdir: str) -> None:
  """Refuses a multi-host workdir that is not one folder every process sees (NFS, a
  mounted bucket): Orbax checkpoints and process 0's outputs would be missing elsewhere."""
  nonce = int(parallel_lib.broadcast_from_main(np.int32(time.time_ns() % 2**31)))
  probe = os.path.join(workdir, f".shared_probe_{nonce}")
  if jax.process_index() == 0:
    with open(probe, "w") as f:
      f.write("ok")
  parallel_lib.sync_hosts(f"shared probe {nonce} written")
  blind = np.flatnonzero(~parallel_lib.gather_hosts(np.array([os.path.exists(probe)])))
  parallel_lib.sync_hosts(f"shared probe {nonce} read")
  if jax.process_index() == 0:
    os.remove(probe)
  if len(blind):
    raise UserError(f"the workdir {workdir} is not shared: processes {blind.tolist()} do not "
                    "see the files process 0 writes there; a multi-host run needs a folder "
                    "every host sees (NFS, a mounted bucket)")


def backbone(model_config: ml_collections.ConfigDict, **overrides):
  """The configured IResNet, its BatchNorm averaged over the data-parallel axis."""
  settings = model_config.to_dict()
  name = settings.pop("name")
  dtype = settings.pop("dtype")
  if settings.get("dropout", 0.0) is None:
    settings["dropout"] = iresnet.STANDARD_DROPOUT.get(name, 0.0)
  if dtype not in DTYPES:
    raise UserError(f"config field model.dtype={dtype!r}: expected one of {list(DTYPES)}")
  settings.update(dtype=DTYPES[dtype], axis_name=parallel_lib.AXIS, **overrides)
  return models.create(name, **settings)


def margin_spec(head_config) -> losses.MarginSpec:
  try:
    return losses.MarginSpec(**head_config.to_dict())
  except (TypeError, ValueError) as e:
    raise UserError(f"config section head: {e}") from e


def init_variables(module, rng, example_input, **kwargs) -> dict:
  """Host (numpy) variables of `module` for inputs shaped like `example_input`."""
  # The weights are made whole on one device, so threefry need not be partitionable; the
  # non-partitionable variant compiles 2-3x faster on CPU.
  with jax.threefry_partitionable(False):
    variables = jax.jit(functools.partial(module.init, **kwargs))(rng, example_input)
  return jax.tree.map(np.asarray, dict(variables))


def optimiser(optim_config, *, global_batch: int, steps_per_epoch: int, groups: dict):
  """SGD over parameter groups; `groups` maps a group name to (base_lr, clip_norm or None).

  Returns (optax transformation, LR schedule of the first group for logging).
  """
  param_groups = {}
  for name, (base_lr, clip_norm) in groups.items():
    schedule = state_lib.step_decay_schedule(
        state_lib.scaled_lr(base_lr, global_batch), steps_per_epoch,
        tuple(optim_config.lr_decay_epochs), optim_config.lr_decay_factor)
    param_groups[name] = state_lib.ParamGroup(schedule, clip_norm or None)
  tx = state_lib.sgd(param_groups, momentum=optim_config.momentum,
                     weight_decay=optim_config.weight_decay)
  return tx, next(iter(param_groups.values())).schedule


def backbone_and_head_groups(optim_config) -> dict:
  """The usual parameter groups: the backbone clipped, the head at head_base_lr (or base_lr)."""
  head_lr = (optim_config.head_base_lr if optim_config.head_base_lr >= 0
             else optim_config.base_lr)
  return {"backbone": (optim_config.base_lr, optim_config.clip_norm), "head": (head_lr, None)}


def loop_settings(config, name: str, num_examples: int,
                  epochs_field: str = "train.epochs") -> loop.LoopSettings:
  steps_per_epoch, total = loop.steps_for(num_examples, config.train.batch_size,
                                          config.train.epochs)
  return loop.LoopSettings(
      name=name, total_steps=total, steps_per_epoch=steps_per_epoch,
      images_per_step=config.train.batch_size, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints, epochs_field=epochs_field)


def training_record(workdir: str, settings: loop.LoopSettings) -> dict:
  """How far the stage trained (convergence.summarize over the loop's saved history) and
  its "warnings" ([] or the one not-converged line, also printed here)."""
  summary = convergence.summarize(loop.load_history(workdir), settings.steps_per_epoch)
  warning = convergence.warning(settings.name, summary, settings.epochs_field)
  if warning:
    print(f"WARNING: {warning}", flush=True)
  return {**summary, "warnings": [warning] if warning else []}


EVAL_SELECTION = ("last", "validation")


def evaluation_fields(train_config, section: str = "train") -> tuple[int, str]:
  """(eval_every, select) of a `train` config section, checked; UserError naming the field."""
  every = train_config.get("eval_every", 0)
  select = train_config.get("select", "last")
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise UserError(f"config field {section}.eval_every={every!r}: expected an integer >= 0 "
                    "(steps between evaluations; 0 = off)")
  if select not in EVAL_SELECTION:
    raise UserError(f"config field {section}.select={select!r}: expected one of "
                    f"{EVAL_SELECTION}")
  return every, select


def training_evaluation(config, workdir: str, module, parallel) -> loop.Evaluation | None:
  """The loop's verification during training from train.eval_every (steps, 0 = off) and
  train.select ("last": the final state is the model; "validation": the state of the best
  mean validation accuracy, which needs a held-out validation split). Evaluates on the
  validation pairs where the data has them, else on the test pairs, for watching only."""
  every, select = evaluation_fields(config.train)
  has_validation = sources.has_validation(config.data)
  if select == "validation":
    if not has_validation:
      raise UserError("config field train.select='validation' needs a held-out validation "
                      "split (data.synthetic.validation_identities_per_group > 0, or "
                      "data.tfds.validation); selecting on the test pairs would report a "
                      "test score chosen on the test set")
    if not every:
      raise UserError("config field train.select='validation' needs train.eval_every > 0 "
                      "(how often to evaluate)")
  if not every:
    return None
  pairs = (sources.validation_sets(config.data, workdir) if has_validation
           else sources.verification_sets(config.data, workdir))
  batch = config.train.eval_batch_size

  def accuracy(state):
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    results = evaluate_embeddings(
        verification_embeddings(variables, module, pairs, parallel, batch))
    return {g: r["accuracy"] for g, r in results.items()}

  label = "validation" if has_validation else "verification"
  return loop.Evaluation(fn=accuracy, every=every, label=label,
                         select=select == "validation")


def embed_images(variables, module, images: np.ndarray, parallel, batch_size: int):
  """Raw embeddings of uint8 images and of their horizontal flips: two float32 [N, D].

  With several processes each embeds its contiguous share of the images on its own devices
  (each device gets the per-device batch of a single process with as many devices) and the
  shares are gathered, so every process returns all N rows, as a 1-process run would.
  """
  apply = _embed_fn(module, parallel)
  device_vars = parallel.replicate(variables)
  hosts, host = jax.process_count(), jax.process_index()
  local = parallel.local_device_count
  per_device = max(1, -(-batch_size // parallel.device_count))
  chunk = per_device * local
  share = -(-len(images) // hosts)
  batches = input_pipeline.eval_batches(images[host * share:(host + 1) * share],
                                        batch_size=chunk, local_device_count=local)
  embeddings, flipped = [], []
  # Every process runs the same number of batches: each is one program over all devices,
  # so a last host with a short (or empty) share feeds blank batches.
  for _ in range(-(-share // chunk)):
    batch, count = next(batches, (None, 0))
    if batch is None:
      batch = {"image": np.zeros((local, per_device) + images.shape[1:], np.float32)}
    out = parallel.fetch(apply(device_vars, parallel.shard(batch)))
    embeddings.append(out["embedding"].reshape(-1, out["embedding"].shape[-1])[:count])
    flipped.append(out["embedding_flip"].reshape(-1, out["embedding"].shape[-1])[:count])
  embeddings, flipped = np.concatenate(embeddings), np.concatenate(flipped)
  if hosts == 1:
    return embeddings, flipped
  return tuple(parallel_lib.gather_hosts(_pad_rows(e, share))[:len(images)]
               for e in (embeddings, flipped))


def _pad_rows(rows: np.ndarray, count: int) -> np.ndarray:
  return np.concatenate([rows, np.zeros((count - len(rows),) + rows.shape[1:], rows.dtype)])


@functools.lru_cache(maxsize=16)
def _embed_fn(module, parallel):
  # Cached so stages embedding with the same module reuse one compiled function.
  return parallel.wrap_apply(functools.partial(steps.embed, backbone=module))


def verification_embeddings(variables, module, verification_sets: dict, parallel,
                            batch_size: int) -> dict:
  """{group: (embeddings, flip embeddings, issame)} of every group's pair images."""
  out = {}
  for group, vset in verification_sets.items():
    emb, emb_flip = embed_images(variables, module, vset.pair_images(), parallel, batch_size)
    out[group] = (emb, emb_flip, vset.issame)
  return out


def evaluate_embeddings(embeddings: dict) -> dict:
  """{group: evaluate_verification result} from `verification_embeddings`' output."""
  return {g: verification.evaluate_verification(e, f, same)
          for g, (e, f, same) in embeddings.items()}


def save_embeddings(workdir: str, embeddings: dict) -> str:
  """Writes a model's verification embeddings (what the report evaluates) atomically."""
  path = os.path.join(workdir, "verification_embeddings.npz")
  arrays = {}
  for group, (emb, emb_flip, same) in embeddings.items():
    arrays.update({f"{group}/embedding": emb, f"{group}/embedding_flip": emb_flip,
                   f"{group}/issame": same})
  atomic_save_npz(path, arrays)
  return path


def load_embeddings(workdir: str) -> dict:
  path = os.path.join(workdir, "verification_embeddings.npz")
  try:
    with np.load(path) as data:
      groups = sorted({k.split("/")[0] for k in data.files})
      return {g: (data[f"{g}/embedding"], data[f"{g}/embedding_flip"], data[f"{g}/issame"])
              for g in groups}
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); rerun the stage that wrote it") from e


def atomic_save_npz(path: str, arrays: dict) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


@contextlib.contextmanager
def npy_writer(path: str, shape: tuple, dtype=np.float32, enabled: bool = True):
  """Yields a memory-mapped array [shape] to fill in chunks; it becomes the .npy `path` only
  when the block ends without an error (an earlier file there stays until then), so arrays
  larger than memory are written whole or not at all. Yields None where not `enabled`
  (processes other than 0)."""
  if not enabled:
    yield None
    return
  tmp = path + ".tmp.npy"
  array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
  done = False
  try:
    yield array
    array.flush()
    done = True
  finally:
    del array
    if done:
      os.replace(tmp, path)
    else:
      os.remove(tmp)


def save_model(workdir: str, step: int, variables: dict) -> None:
  """The trained network's variables ({"params", "batch_stats"}) under <workdir>/model.

  Every process calls it (Orbax synchronizes them); process 0 writes the host arrays.
  """
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  checkpoints.save(step, variables)
  checkpoints.wait()
  checkpoints.close()


def load_model(workdir: str, template: dict, stage: str) -> dict:
  """Variables saved by `save_model`, shaped like `template` (shapes checked)."""
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"no trained model in {workdir}/model: run the stage {stage!r} first")
    problems = []
    stored = checkpoints.manager.item_metadata(step).tree
    for part in template:
      problems += shape_mismatches(flat_shapes(template[part], f"{part}/"),
                                   flat_shapes(stored.get(part) or {}, f"{part}/"))
    if problems:
      raise UserError(f"the model in {workdir}/model does not match this config:\n  "
                      + "\n  ".join(problems))
    return checkpoints.restore_tree(step, template)
  finally:
    checkpoints.close()


def finish_model(config, workdir: str, name: str, step: int, variables: dict, module,
                 parallel) -> dict:
  """What every trained backbone stage ends with: save the network under <workdir>/model,
  embed every group's verification pairs (kept for the report) and print the per-group
  accuracy. The stage then writes results.json (`write_results`). Returns {group:
  evaluate_verification result}."""
  results = _evaluated(workdir, step)
  if results is not None:  # a rerun of a finished run: its model and embeddings are saved
    print(f"[{name}] verification accuracy (saved at step {step}): {accuracy_line(results)}",
          flush=True)
  else:
    save_model(workdir, step, variables)  # Orbax: every process takes part, process 0 writes.
    embeddings = verification_embeddings(
        variables, module, sources.verification_sets(config.data, workdir), parallel,
        config.train.eval_batch_size)
    results = evaluate_embeddings(embeddings)
    print(f"[{name}] verification accuracy: {accuracy_line(results)}", flush=True)
    if jax.process_index() == 0:
      save_embeddings(workdir, embeddings)
  return results


def backbone_result(final, workdir: str, evaluation: loop.Evaluation | None):
  """(backbone variables, their step, selection record or None) of a trained teacher or
  student: the final state, or with train.select='validation' the best one the loop kept."""
  if evaluation is None or not evaluation.select:
    variables = {"params": final.params["backbone"], "batch_stats": final.batch_stats}
    return variables, int(final.step), None
  best, info = loop.load_best(workdir, loop.best_variables(final))
  print(f"[{os.path.basename(workdir)}] selected step {info['step']} (mean validation "
        f"accuracy {100 * info['mean_accuracy']:.2f}%)", flush=True)
  variables = {"params": best["params"]["backbone"], "batch_stats": best["batch_stats"]}
  return variables, int(info["step"]), info


def warn_collapse(name: str, statistics: dict) -> str | None:
  """Prints the collapse warning of a target space's statistics (target_space); returns it."""
  warning = target_space.collapse_warning(name, statistics)
  if warning:
    print(f"WARNING: {warning}", flush=True)
  return warning


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON, atomically (a temporary file renamed over `path`)."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def write_results(workdir: str, name: str, step: int, results: dict,
                  record: dict | None = None) -> None:
  """<workdir>/results.json (process 0): the model, its step, the per-group verification
  summary and the entries of `record`."""
  if jax.process_index() != 0:
    return
  summary = {g: {k: r[k] for k in ("accuracy", "accuracy_std", "accuracy_noflip")}
             for g, r in results.items()}
  write_json(os.path.join(workdir, "results.json"),
             {"model": name, "step": int(step), "verification": summary, **(record or {})})


def read_results(workdir: str) -> dict:
  """The results.json a stage wrote ({} where it wrote none)."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise UserError(f"{workdir}/results.json is unreadable ({e}); rerun its stage") from e


def _evaluated(workdir: str, step: int) -> dict | None:
  """The verification results that `finish_model` saved for `step` in this workdir (model,
  embeddings and results.json all of that step), recomputed from the saved embeddings; None
  where anything is missing or of another step."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      if json.load(f).get("step") != int(step):
        return None
  except (OSError, ValueError):
    return None
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  try:
    if checkpoints.latest_step() != int(step):
      return None
  finally:
    checkpoints.close()
  try:
    return evaluate_embeddings(load_embeddings(workdir))
  except UserError:
    return None


def accuracy_line(results: dict) -> str:
  return "  ".join(f"{g} {100 * r['accuracy']:.2f}%" for g, r in results.items())
