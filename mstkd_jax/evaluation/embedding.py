"""Embedding images with a backbone on every device, and verification of the embeddings.

`verification_embeddings` -> `evaluate_embeddings` is the path from a network to its
per-group verification results; `save_embeddings`/`load_embeddings` keep the embeddings a
report is computed from.
"""

import functools
import os
import sys
from typing import Iterable, Iterator

import jax
import numpy as np

from mstkd_jax import files
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import verification
from mstkd_jax.train import parallel as parallel_lib, steps

EMBEDDINGS_FILE = "verification_embeddings.npz"


def embed_images(variables, module, images: np.ndarray, parallel, batch_size: int):
  """Raw embeddings of uint8 images [N, H, W, 3] and of their horizontal flips: two float32
  [N, D].

  With several processes each embeds its contiguous share of the images on its own devices
  (each device gets the per-device batch of a single process with as many devices) and the
  shares are gathered, so every process returns all N rows, as a 1-process run would.

  An ONNX model (module an interop.onnx_model.OnnxBackbone, variables {}) runs in
  onnxruntime on the CPU instead, batch_size images at a time, in every process.
  """
  from mstkd_jax.interop import onnx_model  # pylint: disable=g-import-not-at-top
  if isinstance(module, onnx_model.OnnxBackbone):
    return module.embed(images, batch_size)
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


def embed_stream(variables, module, chunks: Iterable[np.ndarray], parallel, batch_size: int,
                 *, total: int | None = None, desc: str = "embedding"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`embed_images` of images that arrive in chunks, so that only one chunk of decoded
  images is in memory at a time; a progress bar (images) on stderr when it is a terminal.

  Args:
    chunks: non-empty uint8 arrays [n_i, H, W, 3] of the model's input size. With several
      processes every process must pass the same chunks (each embeds its share of a chunk).
    total: the number of images in all chunks, for the progress bar's ETA (None: unknown).
  Yields:
    (raw embeddings float32 [n_i, D], raw embeddings of the horizontal flips [n_i, D]) of
    each chunk, in order.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  show = jax.process_index() == 0 and sys.stderr.isatty()
  with tqdm.tqdm(total=total, unit="img", desc=desc, disable=not show) as bar:
    for chunk in chunks:
      embeddings, flipped = embed_images(variables, module, chunk, parallel, batch_size)
      bar.update(len(chunk))
      yield embeddings, flipped


def _pad_rows(rows: np.ndarray, count: int) -> np.ndarray:
  return np.concatenate([rows, np.zeros((count - len(rows),) + rows.shape[1:], rows.dtype)])


@functools.lru_cache(maxsize=16)
def _embed_fn(module, parallel):
  # Cached so stages embedding with the same module reuse one compiled function.
  return parallel.wrap_apply(functools.partial(steps.embed_step, backbone=module))


def verification_embeddings(variables, module, verification_sets: dict, parallel,
                            batch_size: int) -> dict:
  """{group: (embeddings [2P, D], flip embeddings [2P, D], issame [P])} of every group's
  pair images."""
  out = {}
  for group, vset in verification_sets.items():
    emb, emb_flip = embed_images(variables, module, vset.pair_images(), parallel, batch_size)
    out[group] = (emb, emb_flip, vset.issame)
  return out


def evaluate_embeddings(embeddings: dict) -> dict:
  """{group: verification.evaluate_verification result} of `verification_embeddings`."""
  return {g: verification.evaluate_verification(e, f, same)
          for g, (e, f, same) in embeddings.items()}


def save_embeddings(workdir: str, embeddings: dict) -> str:
  """Writes a model's verification embeddings (what the report evaluates) atomically to
  <workdir>/verification_embeddings.npz; returns its path."""
  path = os.path.join(workdir, EMBEDDINGS_FILE)
  arrays = {}
  for group, (emb, emb_flip, same) in embeddings.items():
    arrays.update({f"{group}/embedding": emb, f"{group}/embedding_flip": emb_flip,
                   f"{group}/issame": same})
  files.save_npz(path, arrays)
  return path


def load_embeddings(workdir: str) -> dict:
  """What `save_embeddings` wrote in `workdir`; UserError naming the file if unreadable."""
  path = os.path.join(workdir, EMBEDDINGS_FILE)
  try:
    with files.load_npz(path) as data:
      groups = sorted({k.split("/")[0] for k in data.files})
      return {g: (data[f"{g}/embedding"], data[f"{g}/embedding_flip"], data[f"{g}/issame"])
              for g in groups}
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); rerun the stage that wrote it") from e


def accuracy_line(results: dict) -> str:
  """"group 91.23%  ..." of `evaluate_embeddings` results."""
  return "  ".join(f"{g} {100 * r['accuracy']:.2f}%" for g, r in results.items())
