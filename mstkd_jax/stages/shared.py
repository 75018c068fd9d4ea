"""What every stage does around its networks: set-up (`StageRun`), its inputs (`Inputs`),
caches, and the end of a trained backbone (`backbone_result`, `finish_model`).

Configs are read here and in the stage files only; models, losses and steps take plain
values.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from mstkd_jax import errors, files, models, paths, workdir as workdir_lib
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding, report as report_lib, space_report
from mstkd_jax.train import build, convergence, loop, parallel as parallel_lib, state as state_lib


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The folders of earlier stages that a stage reads: not in its config, so a moved workdir
  is still the same stage (the pipeline fingerprints the inputs' own fingerprints)."""
  teacher_dirs: tuple[str, ...] = ()    # frozen teachers, in teacher order
  extract_dir: str = ""                 # the extraction stage (teacher embeddings)
  adaptor_dir: str = ""                 # the adaptor stage (targets); "" = no adaptor
  checkpoint: str = ""                  # a network made elsewhere, to import (imported.py)


# The memory-mapped caches a stage writes for the next one (in its cache folder).
TEACHER_EMBEDDINGS = "teacher_embeddings.npy"   # extraction: [N, 2, sum D_g]
TARGETS = "targets.npy"                         # adaptor: [N, 2, D]


def cache_file(config, stage_dir: str, name: str, make: bool = False) -> str:
  """The local path (paths.cache_dir: a memory map needs a local disk) of the cache `name`
  of the stage in `stage_dir`. `make` (the writer) makes its folder; readers take a cache
  missing there from the stage's own local folder (written before cache_dir was set)."""
  folder = paths.cache_dir(config.get("cache_dir", ""), stage_dir)
  path = os.path.join(folder, name)
  if make:
    files.makedirs(folder)
  elif not paths.is_url(stage_dir) and not os.path.exists(path):
    in_stage = os.path.join(stage_dir, name)
    if os.path.exists(in_stage):
      return in_stage
  return path


def cache_folder(config, stage_dir: str) -> str | None:
  """The local folder of the stage's caches (cache_dir, or a URL stage folder's); None
  where they are in the stage folder, among its outputs."""
  folder = paths.cache_dir(config.get("cache_dir", ""), stage_dir)
  return None if folder == paths.resolve(stage_dir, "workdir") else folder


def writes_caches(config, stage_dir: str) -> bool:
  """Whether this process writes the stage's caches: process 0 for the stage folder, else
  the first process of each machine (every machine writes the same bytes). Every process
  must call it (a gather)."""
  if cache_folder(config, stage_dir) is None:
    return jax.process_index() == 0
  return parallel_lib.first_process_on_host()


@dataclasses.dataclass(frozen=True)
class StageRun:
  """A training stage's set-up: its checked workdir, training set and devices."""
  config: ml_collections.ConfigDict
  workdir: str
  name: str
  train_set: sources.TrainingSet
  parallel: parallel_lib.DataParallel
  role: str                      # teacher, adaptor or student: its section in the recipe

  @classmethod
  def create(cls, config, workdir: str, name: str, role: str) -> "StageRun":
    """Prepares the workdir, opens the training set and the devices and checks that
    train.batch_size (where there is one) splits over them.

    Raises:
      UserError: from the workdir, the data or the batch split, naming the field.
    """
    workdir = workdir_lib.prepare(config, workdir)
    train_set = sources.training_set(config.data, workdir)
    parallel = parallel_lib.get(config.parallelism, config.num_devices)
    if "batch_size" in config.train:
      input_pipeline.check_batch_split(config.train.batch_size, parallel.device_count,
                                       jax.process_count())
    return cls(config, workdir, name, train_set, parallel, role)

  def settings(self, num_examples: int, **changes) -> loop.LoopSettings:
    """The loop's settings for `num_examples` per epoch, with `changes` applied; messages
    name `train` in a stage's own config file, `<role>.train` in the recipe's."""
    section = "train" if "stage" in self.config else f"{self.role}.train"
    settings = build.loop_settings(self.config, self.name, num_examples)
    return dataclasses.replace(settings, train_section=section, **changes)

  def batch_plan(self, settings: loop.LoopSettings) -> dict:
    """The keyword arguments every training batch iterator takes."""
    return dict(global_batch=self.config.train.batch_size,
                steps_per_epoch=settings.steps_per_epoch, seed=self.config.seed,
                total_steps=settings.total_steps,
                local_device_count=self.parallel.local_device_count)

  def init_rngs(self) -> tuple[jax.Array, jax.Array]:
    """(network, margin head) initialization keys of config.seed."""
    return tuple(jax.random.split(jax.random.PRNGKey(self.config.seed)))

  def image_example(self) -> np.ndarray:
    """A zero float32 batch [1, H, W, 3] of the training set's image shape."""
    return np.zeros((1,) + self.train_set.image_shape, np.float32)

  def state(self, settings: loop.LoopSettings, params: dict, batch_stats: dict,
            groups: dict) -> tuple:
    """(host TrainState of `params`, its optax SGD over `groups`, the LR schedule)."""
    tx, schedule = build.optimizer(self.config.optim,
                                   global_batch=self.config.train.batch_size,
                                   steps_per_epoch=settings.steps_per_epoch, groups=groups)
    init_state = jax.tree.map(np.asarray, state_lib.create_state(params, batch_stats, tx))
    return init_state, tx, schedule

  def with_class_shards(self, num_classes: int) -> tuple:
    """(this stage on devices that split the margin head's centres as head.shard_classes
    and head.sample_rate say, sharded_head.ClassShards or None, the head's MarginSpec)."""
    parallel, classes = build.class_shards(self.config.head, self.parallel, num_classes)
    margin = build.margin_spec(self.config.head, shards_classes=True)
    return dataclasses.replace(self, parallel=parallel), classes, margin

  def train(self, settings: loop.LoopSettings, init_state, step_fn, batches, **kwargs):
    """loop.train here (step RNG from config.seed + 1); `batches(start_step)` yields the
    batches from a step on. Returns the final state."""
    return loop.train(workdir=self.workdir, settings=settings, init_state=init_state,
                      step_fn=step_fn, batches=batches, parallel=self.parallel,
                      rng=jax.random.PRNGKey(self.config.seed + 1), **kwargs)

  def train_backbone(self, settings: loop.LoopSettings, init_state, step_fn, batches, module,
                     **kwargs) -> tuple:
    """`train` with `training_evaluation`, then `finish_model` of the backbone it keeps (the
    final one, or with train.select='validation' the best): (final state, kept variables,
    their step, verification results, {"training", "selected": None or the record})."""
    evaluation = training_evaluation(self, module)
    final = self.train(settings, init_state, step_fn, batches, evaluation=evaluation,
                       **kwargs)
    kept, selected = {"params": final.params, "batch_stats": final.batch_stats}, None
    if evaluation is not None and evaluation.select:
      kept, selected = loop.load_best(self.workdir, loop.best_variables(final))
      print(f"[{os.path.basename(self.workdir)}] selected step {selected['step']} (mean "
            f"validation accuracy {100 * selected['mean_accuracy']:.2f}%)", flush=True)
    step = int(final.step if selected is None else selected["step"])
    variables = {"params": kept["params"]["backbone"], "batch_stats": kept["batch_stats"]}
    record = {"training": training_record(self.workdir, settings), "selected": selected}
    return final, variables, step, finish_model(self, step, variables, module), record


def margin_head(num_classes: int, rng, embedding_size: int) -> tuple:
  """(margin head module over `num_classes`, its params for `embedding_size`-D inputs)."""
  head = models.create("margin_head", num_classes=num_classes)
  example = np.zeros((1, embedding_size), np.float32)
  return head, build.init_variables(head, rng, example)["params"]


def training_record(workdir: str, settings: loop.LoopSettings) -> dict:
  """convergence.summarize of the loop's history with "warnings" (the not-converged line,
  printed too)."""
  summary = convergence.summarize(loop.load_history(workdir), settings.steps_per_epoch)
  warning = convergence.warning(settings.name, summary, f"{settings.train_section}.epochs")
  if warning:
    errors.warn(warning)
  return {**summary, "warnings": [warning] if warning else []}


EVAL_SELECTION = ("last", "validation")


def training_evaluation(stage: StageRun, module) -> loop.Evaluation | None:
  """The loop's verification during training (train.eval_every steps, 0 = off).

  train.select "validation" keeps the state of the best mean validation accuracy (it needs
  a held-out split); without one the test pairs are evaluated, for watching only.
  """
  config = stage.config
  every = config.train.get("eval_every", 0)
  select = config.train.get("select", "last")
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise UserError(f"config field train.eval_every={every!r}: expected an integer >= 0 "
                    "(steps between evaluations; 0 = off)")
  if select not in EVAL_SELECTION:
    raise UserError(f"config field train.select={select!r}: expected one of "
                    f"{EVAL_SELECTION}")
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
  pairs = (sources.validation_sets(config.data, stage.workdir) if has_validation
           else sources.verification_sets(config.data, stage.workdir))
  batch = config.train.eval_batch_size

  def accuracy(state):
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    results = embedding.evaluate_embeddings(
        embedding.verification_embeddings(variables, module, pairs, stage.parallel, batch))
    return {g: r["accuracy"] for g, r in results.items()}

  label = "validation" if has_validation else "verification"
  return loop.Evaluation(fn=accuracy, every=every, label=label,
                         select=select == "validation")


def finish_model(stage: StageRun, step: int, variables: dict, module) -> dict:
  """Saves the backbone under model/ and its embeddings of every group's verification pairs
  and prints their accuracy; returns {group: evaluate_embeddings result}."""
  results = _evaluated(stage.workdir, step)
  if results is not None:  # a rerun of a finished run: its model and embeddings are saved
    print(f"[{stage.name}] verification accuracy (saved at step {step}): "
          f"{embedding.accuracy_line(results)}", flush=True)
    return results
  workdir_lib.save_model(stage.workdir, step, variables)  # every process takes part
  embeddings = embedding.verification_embeddings(
      variables, module, sources.verification_sets(stage.config.data, stage.workdir),
      stage.parallel, stage.config.train.eval_batch_size)
  results = embedding.evaluate_embeddings(embeddings)
  print(f"[{stage.name}] verification accuracy: {embedding.accuracy_line(results)}", flush=True)
  for warning in report_lib.model_warnings(stage.name, results):
    errors.warn(warning)
  if jax.process_index() == 0:
    embedding.save_embeddings(stage.workdir, embeddings)
  return results


def _evaluated(workdir: str, step: int) -> dict | None:
  """The results `finish_model` saved for `step` (model, embeddings and results.json all of
  it), recomputed from the embeddings; None where any is missing or of another step."""
  try:
    if workdir_lib.read_results(workdir).get("step") != int(step):
      return None
  except UserError:
    return None
  if workdir_lib.model_step(workdir) != int(step):
    return None
  try:
    return embedding.evaluate_embeddings(embedding.load_embeddings(workdir))
  except UserError:
    return None


def warn_collapse(name: str, statistics: dict) -> str | None:
  """Prints the collapse warning of a target space's statistics (space_report); returns it."""
  warning = space_report.collapse_warning(name, statistics)
  if warning:
    errors.warn(warning)
  return warning


def stage_network(stage_dir: str) -> dict:
  """The `model` section of the config.json the stage in `stage_dir` ran with.

  Raises:
    UserError: config.json is missing or holds no model section.
  """
  path = os.path.join(stage_dir, "config.json")
  config = files.read_json(path, "the config.json of a finished stage; rerun that stage",
                           missing=None)
  if config is None:
    raise UserError(f"{path} is missing: the stage in {stage_dir} has not run; run it first")
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise UserError(f"{path} holds no model section; rerun the stage in {stage_dir}")
  return config["model"]


def frozen_backbone(stage_dir: str, image_example: np.ndarray, built: dict | None = None):
  """(module, variables) of the backbone saved by the stage in `stage_dir`, checked against
  the network it ran with for images like `image_example` [1, H, W, 3]. `built` ({} shared
  by one stage's calls) lets teachers of one network share one module and template.

  Raises:
    UserError: config.json or the model is missing, or the model does not fit.
  """
  network = stage_network(stage_dir)
  key = json.dumps(network, sort_keys=True)
  built = {} if built is None else built
  if key not in built:
    module = build.backbone(ml_collections.ConfigDict(network))
    built[key] = (module, build.template_variables(module, image_example, train=False))
  module, template = built[key]
  return module, workdir_lib.load_model(stage_dir, template, stage_dir)


def adaptor_template(adaptor, input_size: int) -> dict:
  """Zero {"params"} of the adaptor network for `input_size` teacher inputs."""
  variables = build.template_variables(adaptor, np.zeros((1, input_size), np.float32))
  return {"params": variables["params"]}


def embedding_size(module, variables, image_example) -> int:
  """The embedding size `module` gives for images like `image_example` (traced only)."""
  shape = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables,
                         image_example).shape
  return int(shape[-1])
