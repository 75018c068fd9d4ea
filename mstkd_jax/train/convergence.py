"""How far a training stage got, and a warning when it ended far from convergence.

Pure numpy over the loop's per-step history. A stage is far from convergence when:
- its loss still fell by more than STILL_FALLING over the last TAIL_FRACTION of its steps
  (least-squares line, relative to the tail's mean) and by more than NOISE_SE standard
  errors, so that the noise of a short tail (about +-20% over 9 steps) is not a trend;
- its last epoch's mean loss lies more than RISING above its lowest epoch mean (a KD loss
  towards collapsed targets rose from 13 to 20 while the LR decayed);
- a classification stage ended its last epoch below MIN_TRAIN_ACCURACY training accuracy
  (argmax of the class-centre cosines, no margins): a margin head that fits its identities
  classifies nearly all of them (a starved adaptor ended at 0.58).
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
  """(change, standard error) of the loss across the last `fraction` of the steps.

  The change is the slope of the least-squares line through those per-step losses times
  (tail length - 1), divided by their mean (negative = falling); its standard error comes
  from the slope's (residuals over n - 2 degrees of freedom). None with fewer than 3 steps
  in the tail or a tail of mean 0.
  """
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


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def summarize(history: Mapping[str, Sequence[float]], steps_per_epoch: int) -> dict:
  """The convergence record of a finished stage.

  `history` holds per-step lists ("loss"; "accuracy" for a margin head), [t - 1] being step
  t's. Returns {"steps", "first_epoch_loss", "lowest_epoch_loss" (of a complete epoch),
  "final_epoch_loss" (the last steps_per_epoch steps), "final_epoch_accuracy" (None without
  an accuracy), "tail_loss_change" and "tail_loss_change_se" (`tail_change`, or None)}.
  """
  losses = list(history.get("loss", ()))
  per_epoch = max(int(steps_per_epoch), 1)
  epochs = len(losses) // per_epoch
  tail = tail_change(losses) or (None, None)
  return {
      "steps": len(losses),
      "first_epoch_loss": _mean(losses[:per_epoch]),
      "lowest_epoch_loss": float(np.min(np.mean(np.reshape(
          losses[:epochs * per_epoch], (epochs, per_epoch)), axis=1))) if epochs else None,
      "final_epoch_loss": _mean(losses[-per_epoch:]),
      "final_epoch_accuracy": _mean(list(history.get("accuracy", ()))[-per_epoch:]),
      "tail_loss_change": tail[0],
      "tail_loss_change_se": tail[1],
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
  """One line naming the stage, what is wrong and the config field to raise, or None."""
  found = problems(summary)
  if not found:
    return None
  loss = summary.get("final_epoch_loss")
  loss_text = f"final-epoch loss {loss:.4g}; " if loss is not None else ""
  return (f"{name} has not converged: {'; '.join(found)} ({loss_text}first epoch "
          f"{summary.get('first_epoch_loss', float('nan')):.4g}). Raise {field} "
          "(and move its LR decay epochs with it).")
