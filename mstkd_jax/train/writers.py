"""Metric writers: clu's TensorBoard + log writer when TensorFlow is installed, else JSON lines.

clu's writers import TensorFlow; a JAX-only machine (a bare GPU box, a colab without TF)
still trains and keeps its metrics in <logdir>/metrics.jsonl. Progress (steps/s, ETA) is
the loop's own line (train/loop.py), the same with either writer.
"""

import json
import os


class JsonLinesWriter:
  """The subset of clu's MetricWriter the loop uses, writing one JSON object per call."""

  def __init__(self, logdir: str, just_logging: bool = False):
    self._path = None if just_logging else os.path.join(logdir, "metrics.jsonl")

  def _write(self, record):
    if self._path:
      with open(self._path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def write_scalars(self, step, scalars):
    self._write({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

  def write_hparams(self, hparams):
    self._write({"hparams": {k: str(v) for k, v in hparams.items()}})

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(logdir: str, *, just_logging: bool):
  """clu's default writer (TensorBoard events + logging), or JsonLinesWriter without TF."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return JsonLinesWriter(logdir, just_logging)
  return metric_writers.create_default_writer(logdir, just_logging=just_logging,
                                              asynchronous=True)
