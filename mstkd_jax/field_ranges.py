"""The kinds of range a config field may hold, each with its test and its words: a number in
an interval (Number), a tuple of them (Numbers), a name out of a registry (Choice), a tuple
of distinct names (Choices), True or False (Flag). The table of the config's fields is
config_ranges.RANGES.

Each kind has accepts(value) -> bool, expected() (the range in words) and refusal(name,
value) (the one line that refuses `value` for the config field `name`). A bool is never a
number, nor NaN or inf a finite one.
"""

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

_REAL = (int, float, np.integer, np.floating)
_INTEGER = (int, np.integer)


def _number_text(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


class Range(abc.ABC):
  """What every kind has: its test, its words, and the line that refuses a value."""

  @abc.abstractmethod
  def accepts(self, value) -> bool:
    """Whether `value` is in the range."""

  @abc.abstractmethod
  def expected(self) -> str:
    """The range in words, e.g. "a finite number > 0"."""

  def refusal(self, name: str, value) -> str:
    return f"config field {name}={value!r}: expected {self.expected()}"


@dataclasses.dataclass(frozen=True)
class Number(Range):
  """A finite number (an integer where `integer`) in [low, high] (an end open where said, an
  end None unbounded), a multiple of `multiple`; `special` values are also accepted, each
  with what it means (None: unset, 0: off, ...); `meaning` ends the message."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  multiple: int = 1
  special: tuple[tuple[object, str], ...] = ()
  meaning: str = ""
  text: str = ""          # the range in words, where an established message says it so

  def accepts(self, value) -> bool:
    if value is None:
      return any(s is None for s, _ in self.special)
    if isinstance(value, bool) or not isinstance(value, _INTEGER if self.integer else _REAL):
      return False
    if any(s is not None and not isinstance(s, bool) and value == s for s, _ in self.special):
      return True
    if not math.isfinite(value):
      return False
    low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
    high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
    return low_ok and high_ok and (self.multiple == 1 or value % self.multiple == 0)

  def range_text(self) -> str:
    if self.text:
      return self.text
    kind = "an integer" if self.integer else "a finite number"
    if self.multiple > 1:
      kind = "an even integer" if self.multiple == 2 else f"a multiple of {self.multiple}"
    low, high = (_number_text(v) for v in (self.low, self.high))
    if self.low is not None and self.high is not None:
      kind = kind.replace("a finite number", "a number")
      return (f"{kind} in {'(' if self.low_open else '['}{low}, {high}"
              f"{')' if self.high_open else ']'}")
    if self.low is not None and self.multiple > 2 and self.low == self.multiple:
      return f"a positive {kind[2:]}"
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {low}"
    if self.high is not None:
      return f"{kind} {'<' if self.high_open else '<='} {high}"
    return kind

  def expected(self) -> str:
    special = [f"{s!r} ({meaning})" for s, meaning in self.special]
    text = " or ".join(special + [self.range_text()])
    return f"{text} ({self.meaning})" if self.meaning else text


@dataclasses.dataclass(frozen=True)
class Numbers(Range):
  """A tuple of `item` numbers: `length` of them where given, in non-decreasing order where
  `ordered`; with `scalar`, a single number stands for all."""
  item: Number
  length: int | None = None
  ordered: bool = False
  scalar: bool = False
  meaning: str = ""

  def accepts(self, value) -> bool:
    if self.scalar and isinstance(value, _REAL):
      return self.item.accepts(value)
    if not isinstance(value, (tuple, list)):
      return False
    if self.length is not None and len(value) != self.length:
      return False
    if self.ordered and any(b < a for a, b in zip(value, value[1:])
                            if isinstance(a, _REAL) and isinstance(b, _REAL)):
      return False
    return all(self.item.accepts(v) for v in value)

  def expected(self) -> str:
    count = f"{self.length} " if self.length is not None else ""
    item = self.item.range_text()
    plural = (item.replace("an integer", "integers").replace("a finite number", "finite numbers")
              .replace("a number", "numbers"))
    text = f"a tuple of {count}{plural}"
    if self.ordered:
      text += ", in non-decreasing order"
    if self.scalar:
      text = f"{item}, or {text}"
    return f"{text} ({self.meaning})" if self.meaning else text


@dataclasses.dataclass(frozen=True)
class Choice(Range):
  """One of the names `values()` gives (a registry, read when checked)."""
  values: Callable[[], Sequence[str]]
  in_stages: bool = False   # registered in stages/ (config_ranges.check's stage_vocabulary)

  def accepts(self, value) -> bool:
    return isinstance(value, str) and value in self.values()

  def expected(self) -> str:
    return f"one of {list(self.values())}"


@dataclasses.dataclass(frozen=True)
class Choices(Choice):
  """A tuple of distinct names out of `values()`."""

  def accepts(self, value) -> bool:
    return (isinstance(value, (tuple, list)) and all(Choice.accepts(self, v) for v in value)
            and len(set(value)) == len(value))

  def expected(self) -> str:
    return f"a tuple of some of {list(self.values())}, each at most once"

  def refusal(self, name: str, value) -> str:
    if not isinstance(value, (tuple, list)):
      return super().refusal(name, value)
    allowed = self.values()
    for member in value:
      if not isinstance(member, str) or member not in allowed:
        return f"config field {name} holds {member!r}; expected some of {list(allowed)}"
    twice = next(m for i, m in enumerate(value) if m in value[:i])
    return (f"config field {name}={tuple(value)!r} names {twice!r} twice; expected each at "
            "most once")


@dataclasses.dataclass(frozen=True)
class Flag(Range):
  """True or False."""

  def accepts(self, value) -> bool:
    return isinstance(value, (bool, np.bool_))

  def expected(self) -> str:
    return "True or False"
