"""How far a training stage got: its last epoch's loss and accuracy, whether the loss was
still moving at the end, and a warning when it ended far from convergence.

Pure numpy over the per-step history the loop keeps (loss, and training accuracy for the
stages with a margin head). "Far from convergence" is defined by three tests, each with its
constant below; a stage fails when any one holds:

- the loss still fell by more than STILL_FALLING (5%) across the last TAIL_FRACTION (10%)
  of the steps (least-squares line through the per-step losses of that tail, its change
  over the tail relative to the tail's mean loss), and by more than NOISE_SE (2) standard
  errors of that estimate, so that the noise of per-step losses over a short tail (9 steps
  of a small stage give about +-20%) is not read as a trend: more steps would have
  lowered it;
- its last epoch's mean loss lies more than RISING (10%) above its lowest epoch mean: the
  loss rose while training went on (a KD loss towards collapsed targets did this, 13 to
  20 while the LR decayed), so the stage is not settling;
- a classification stage (one with a training accuracy: teachers, the adaptor, EAF-KD and
  the student alone) ended its last epoch below MIN_TRAIN_ACCURACY (0.8) training accuracy
  (argmax of the class-centre cosines, margins not applied). A margin-head network that
  has fit its training identities classifies nearly all of them; the starved adaptor this
  test was written for ended at 0.58 (loss 33 against about 36 at initialisation).
"""

import math
from typing import Mapping, Sequence

import numpy as np

TAIL_FRACTION = 0.1
STILL_FALLING = 0.05
RISING = 0.10
NOISE_SE = 2.0
MIN_TRAIN_ACCURACY = 0.8


def tail_change(losses: Sequence[float], fraction: float = TAIL_FRACTION
                ) -> tuple[float, float] | None:
  """(change, standard error): the relative change of the loss across the last `fraction`
  of the steps, i.e. the slope of the least-squares line through those per-step losses
  times (tail length - 1), divided by their mean, and the standard error of that number
  (from the slope's, residuals over n - 2 degrees of freedom). Negative = falling. None
  with fewer than 3 steps in the tail (nothing to fit) or a tail of mean 0."""
  losses = np.asarray(losses, np.float64)
  count = max(int(math.ceil(fraction * len(losses))), 3)
  if len(losses) < count:
    return None
  tail = losses[-count:]
  mean = float(np.mean(tail))
  if mean == 0:
    return None
  x = np.arange(count, dtype=np.float64) - (count - 1) / 2
  slope = float(np.dot(x, tail - mean) / np.dot(x, x))
  residual = tail - mean - slope * x
  slope_se = math.sqrt(float(np.dot(residual, residual)) / (count - 2) / float(np.dot(x, x)))
  scale = (count - 1) / abs(mean)
  return slope * scale, slope_se * scale


def _epoch_mean(values: Sequence[float], steps_per_epoch: int, last: bool) -> float | None:
  if not len(values):
    return None
  part = values[-steps_per_epoch:] if last else values[:steps_per_epoch]
  return float(np.mean(part))


def _lowest_epoch_mean(values: Sequence[float], steps_per_epoch: int) -> float | None:
  epochs = len(values) // steps_per_epoch
  if not epochs:
    return None
  return float(np.min(np.mean(np.reshape(values[:epochs * steps_per_epoch],
                                         (epochs, steps_per_epoch)), axis=1)))


def summarize(history: Mapping[str, Sequence[float]], steps_per_epoch: int) -> dict:
  """The convergence record of a finished stage.

  Args:
    history: per-step metric lists of the whole run ("loss" required; "accuracy" when the
      stage has a margin head), history[name][t - 1] being step t's value.
    steps_per_epoch: steps in one epoch (>= 1).
  Returns:
    {"steps", "first_epoch_loss", "lowest_epoch_loss" (the lowest mean loss of a complete
    epoch), "final_epoch_loss", "final_epoch_accuracy" (None without an accuracy),
    "tail_loss_change" and "tail_loss_change_se" (relative, see `tail_change`; None when
    too short)}. Epoch means
    are over steps_per_epoch steps; the final epoch is the last steps_per_epoch steps.
  """
  losses = list(history.get("loss", ()))
  accuracy = list(history.get("accuracy", ()))
  per_epoch = max(int(steps_per_epoch), 1)
  tail = tail_change(losses)
  return {
      "steps": len(losses),
      "first_epoch_loss": _epoch_mean(losses, per_epoch, last=False),
      "lowest_epoch_loss": _lowest_epoch_mean(losses, per_epoch),
      "final_epoch_loss": _epoch_mean(losses, per_epoch, last=True),
      "final_epoch_accuracy": _epoch_mean(accuracy, per_epoch, last=True),
      "tail_loss_change": None if tail is None else tail[0],
      "tail_loss_change_se": None if tail is None else tail[1],
  }


def problems(summary: Mapping) -> list[str]:
  """What makes `summary` (from `summarize`) far from convergence; [] when none."""
  out = []
  change = summary.get("tail_loss_change")
  error = summary.get("tail_loss_change_se") or 0.0
  if change is not None and change < -STILL_FALLING and change < -NOISE_SE * error:
    out.append(f"its loss still fell by {-change:.1%} (+-{error:.1%}) over the last "
               f"{TAIL_FRACTION:.0%} of its steps (more than {STILL_FALLING:.0%})")
  final, lowest = summary.get("final_epoch_loss"), summary.get("lowest_epoch_loss")
  if final is not None and lowest and final > (1 + RISING) * lowest:
    out.append(f"its loss rose to {final:.4g} in the last epoch from an epoch mean of "
               f"{lowest:.4g} (more than {RISING:.0%} above it)")
  accuracy = summary.get("final_epoch_accuracy")
  if accuracy is not None and accuracy < MIN_TRAIN_ACCURACY:
    out.append(f"its training accuracy in the last epoch is {accuracy:.2f} "
               f"(below {MIN_TRAIN_ACCURACY:.2f})")
  return out


def warning(name: str, summary: Mapping, field: str) -> str | None:
  """One line naming the stage, what is wrong and the config field to raise; None if the
  stage converged by the tests above."""
  found = problems(summary)
  if not found:
    return None
  loss = summary.get("final_epoch_loss")
  loss_text = f"final-epoch loss {loss:.4g}; " if loss is not None else ""
  return (f"{name} has not converged: {'; '.join(found)} ({loss_text}first epoch "
          f"{summary.get('first_epoch_loss', float('nan')):.4g}). Raise {field} "
          "(and move its LR decay epochs with it).")
