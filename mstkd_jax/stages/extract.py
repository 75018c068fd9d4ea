"""Extraction stage: every frozen teacher of a set embeds every training image and its mirror.

Writes the cache teacher_embeddings.npy (shared.cache_file), float32 [N, 2, sum D_g]: image
n as stored ([:, 0]) and mirrored ([:, 1]), each teacher's L2-normalized embedding
concatenated in teacher order (teachers may differ in embedding size D_g). It is filled a
chunk at a time and read memory-mapped, so it may exceed memory. Also
verification_teacher_embeddings.npz: the same for every group's verification pair images.
"""

import os

import jax
import numpy as np

from mstkd_jax import files, losses, workdir as workdir_lib
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding, target_space
from mstkd_jax.stages import shared
from mstkd_jax.train import parallel as parallel_lib


def _normalized_pair(variables, module, images, parallel, batch_size):
  """L2-normalized embeddings of uint8 images and their mirrors: [N, 2, D]."""
  emb, emb_flip = embedding.embed_images(variables, module, images, parallel, batch_size)
  return np.stack([np.asarray(losses.l2_normalize(emb)),
                   np.asarray(losses.l2_normalize(emb_flip))], axis=1)


def _embed_training_set(variables, module, train_set, parallel, batch_size, out, columns):
  """Writes one teacher's pairs of every training image into out[:, :, columns] by chunks
  (out is None on processes that write no cache)."""
  count = 0
  for images in train_set.image_chunks(max(batch_size, 4096)):
    pairs = _normalized_pair(variables, module, images, parallel, batch_size)
    if out is not None and count + len(pairs) <= len(out):
      out[count:count + len(pairs), :, columns] = pairs
    count += len(pairs)
  if count != train_set.num_examples:
    raise UserError(f"the training set gave {count} images while its labels count "
                    f"{train_set.num_examples}; prepare it again")


def run(config, workdir: str, name: str = "extract",
        inputs: shared.Inputs = shared.Inputs()) -> dict:
  """Embeds the training and verification images with every teacher of
  `inputs.teacher_dirs` (teacher order); returns {"diagnostics": on process 0}.

  Raises:
    UserError: no teachers, a teacher model missing or of another shape, or a training set
      that yields another number of images than its labels.
  """
  teacher_dirs = list(inputs.teacher_dirs)
  if not teacher_dirs:
    raise UserError("the extraction stage needs at least one teacher folder")
  workdir = workdir_lib.prepare(config, workdir)
  train_set = sources.training_set(config.data, workdir)
  verification = sources.verification_sets(config.data, workdir)
  verification_parts = _embed(config, workdir, name, teacher_dirs, train_set, verification)
  cache = shared.cache_file(config, workdir, shared.TEACHER_EMBEDDINGS)
  diagnostics = None
  if jax.process_index() == 0:
    files.save_npz(
        os.path.join(workdir, "verification_teacher_embeddings.npz"),
        {f"{g}/embeddings": np.concatenate(parts, axis=-1)
         for g, parts in verification_parts.items()}
        | {f"{g}/issame": verification[g].issame for g in verification})
    # The space the adaptor starts from: the teachers' concatenation, images as stored.
    embeddings = np.load(cache, mmap_mode="r")
    diagnostics = target_space.space_statistics(embeddings[:, 0], train_set.identity,
                                                train_set.group)
    shared.warn_collapse(f"{name} (concatenated teacher embeddings)", diagnostics)
    files.write_json(os.path.join(workdir, "results.json"),
                     {"stage": name, "diagnostics": {"concatenation": diagnostics}})
  return {"diagnostics": diagnostics}


def _embed(config, workdir: str, name: str, teacher_dirs: list, train_set, verification: dict
           ) -> dict:
  """Writes the teachers' embeddings of the training set into the cache; returns {group:
  [each teacher's [2P, 2, D_g] of the verification pair images]}."""
  parallel = parallel_lib.get(config.parallelism, config.num_devices)
  example = np.zeros((1,) + train_set.image_shape, np.float32)
  built = {}
  teachers = [shared.frozen_backbone(d, example, built) for d in teacher_dirs]
  sizes = [shared.embedding_size(module, variables, example)
           for module, variables in teachers]
  offsets = np.cumsum([0] + sizes)
  batch = config.train.eval_batch_size
  verification_parts = {g: [] for g in verification}
  # Written in place, a chunk at a time: [N, 2, sum D_g] float32 reaches ~20 GB at BUPT
  # scale (4 x 512-D).
  shape = (train_set.num_examples, 2, int(offsets[-1]))
  cache = shared.cache_file(config, workdir, shared.TEACHER_EMBEDDINGS, make=True)
  with files.npy_writer(cache, shape, enabled=shared.writes_caches(config, workdir)
                        ) as train_out:
    for i, (teacher_dir, (module, variables)) in enumerate(zip(teacher_dirs, teachers)):
      print(f"[{name}] teacher {i + 1}/{len(teacher_dirs)} ({teacher_dir}, {sizes[i]}-D) "
            f"embeds {train_set.num_examples} training images and their mirrors", flush=True)
      _embed_training_set(variables, module, train_set, parallel, batch, train_out,
                          slice(offsets[i], offsets[i + 1]))
      for group, vset in verification.items():
        verification_parts[group].append(
            _normalized_pair(variables, module, vset.pair_images(), parallel, batch))
  return verification_parts


def remake_caches(config, workdir: str, name: str = "extract",
                  inputs: shared.Inputs = shared.Inputs()) -> None:
  """Writes teacher_embeddings.npy of the finished stage in `workdir` again (e.g. on
  another machine, where the local cache is missing).

  Raises:
    UserError: as `run`.
  """
  train_set = sources.training_set(config.data, workdir)
  _embed(config, workdir, name, list(inputs.teacher_dirs), train_set, {})


def load(config, extract_dir: str) -> tuple[np.ndarray, dict]:
  """(training [N, 2, sum D_g] memory-mapped, {group: ([2P, 2, sum D_g], issame [P])})
  that `run` wrote for `extract_dir`. Callers flatten the trailing axes, so a cache of
  equal-size teachers as [..., G, D] reads the same."""
  try:
    train = np.load(shared.cache_file(config, extract_dir, shared.TEACHER_EMBEDDINGS),
                    mmap_mode="r")
    with files.load_npz(os.path.join(extract_dir,
                                     "verification_teacher_embeddings.npz")) as data:
      groups = sorted({k.split("/")[0] for k in data.files})
      verification = {g: (data[f"{g}/embeddings"], data[f"{g}/issame"]) for g in groups}
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot read the teacher embeddings in {extract_dir} ({e}); run the "
                    "extraction stage that makes them first") from e
  return train, verification
