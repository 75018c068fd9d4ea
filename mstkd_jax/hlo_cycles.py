"""The TPU compiler's own estimate of a step's time, read from its optimized HLO text.

`compiled.cost_analysis()["optimal_seconds"]` is no step time on libtpu (negative or far off
for whole training steps), but the compiler writes its cost model's cycle count into the
backend config of each instruction it schedules (`"estimated_cycles":"921931"`). Their sum,
each instruction of a while loop's body counted once per trip, is the step's cycles. The
text is internal to XLA and may change: `estimated_cycles` is the one function that reads
it, and any construct it does not recognise makes it answer None ("no estimate") rather
than a wrong number.
"""

import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# The opcode: the first lower-case word followed by "(" after the shape (shapes write their
# layouts as {...:T(8,128)(2,1)S(1)}: upper case, never " word(").
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OPERANDS = re.compile(r"%([\w.\-]+)")
# Opcodes that run another computation whose cost we cannot bound (a branch taken at run
# time) or whose body we do not follow.
_UNKNOWN = ("conditional", "async-start", "call-start")


class _Unrecognised(Exception):
  pass


def _parse(text: str) -> tuple[dict, str | None]:
  """{computation: {instruction: (opcode, rest of line)}} in order, and the ENTRY's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), {})
      if header.group(1):
        entry = header.group(2)
      continue
    if line.strip() == "}":
      current = None
      continue
    instruction = _INSTRUCTION.match(line) if current is not None else None
    if instruction:
      body = instruction.group(3)
      opcode = _OPCODE.search(body)
      current[instruction.group(2)] = (opcode.group(1) if opcode else "", body,
                                       bool(instruction.group(1)))
  return computations, entry


def _attribute(body: str, name: str) -> str | None:
  found = re.search(rf"\b{name}=%?([\w.\-]+)", body)
  return found.group(1) if found else None


def _operands(body: str) -> list[str]:
  """The instruction's operands: the %names inside its opcode's parentheses."""
  start = _OPCODE.search(body).end()
  depth, end = 1, start
  while end < len(body) and depth:
    depth += {"(": 1, ")": -1}.get(body[end], 0)
    end += 1
  return _OPERANDS.findall(body[start:end])


def _constant(computation: dict, name: str) -> int | None:
  """The integer a scalar instruction holds, following copies; None if not a constant."""
  for _ in range(8):
    opcode, body, _ = computation.get(name, ("", "", False))
    if opcode == "constant":
      value = re.search(r"constant\((-?\d+)\)", body)
      return int(value.group(1)) if value else None
    if opcode != "copy":
      return None
    name = _operands(body)[0]
  return None


def _trip_count(computations: dict, caller: dict, body: str) -> int:
  """Trips of a while loop: its known_trip_count, or a counter from a constant start to a
  constant bound, `i < N` (or `N > i`), stepping by 1."""
  known = _TRIP_COUNT.search(body)
  if known:
    return int(known.group(1))
  condition = computations.get(_attribute(body, "condition"))
  loop_body = computations.get(_attribute(body, "body"))
  if not condition or not loop_body:
    raise _Unrecognised("while loop without its computations")
  root = [i for i in condition.values() if i[2]]
  if len(root) != 1 or root[0][0] != "compare":
    raise _Unrecognised("while condition is not one compare")
  direction = re.search(r"direction=(\w+)", root[0][1])
  left, right = _operands(root[0][1])
  if direction and direction.group(1) == "GT":
    left, right = right, left
  elif not direction or direction.group(1) != "LT":
    raise _Unrecognised("while condition is not i < N")
  counter, bound = condition.get(left), _constant(condition, right)
  index = re.search(r"index=(\d+)", counter[1]) if counter else None
  if bound is None or not counter or counter[0] != "get-tuple-element" or not index:
    raise _Unrecognised("while condition does not compare a tuple element with a constant")
  index = int(index.group(1))
  init = caller.get(_operands(body)[0])
  if not init or init[0] != "tuple":
    raise _Unrecognised("while loop's initial value is not a tuple")
  start = _constant(caller, _operands(init[1])[index])
  root = [i for i in loop_body.values() if i[2]]
  step = None
  if len(root) == 1 and root[0][0] == "tuple":
    update = loop_body.get(_operands(root[0][1])[index])
    if update and update[0] == "add":
      step = [_constant(loop_body, o) for o in _operands(update[1])]
  if start is None or not step or 1 not in step:
    raise _Unrecognised("while loop's counter does not start at a constant and step by 1")
  return max(0, bound - start)


def _cycles(computations: dict, name: str, depth: int = 0) -> int:
  if depth > 16 or name not in computations:
    raise _Unrecognised(f"computation {name} not found")
  computation = computations[name]
  total = 0
  for opcode, body, _ in computation.values():
    if opcode in _UNKNOWN:
      raise _Unrecognised(opcode)
    if opcode == "while":
      trips = _trip_count(computations, computation, body)
      total += trips * _cycles(computations, _attribute(body, "body"), depth + 1)
      continue
    if opcode == "call":
      total += _cycles(computations, _attribute(body, "to_apply"), depth + 1)
      continue
    cycles = _CYCLES.search(body)
    if cycles:
      total += int(cycles.group(1))
  return total


def estimated_cycles(hlo_text: str) -> int | None:
  """The compiler's estimated cycles of one call of an optimized TPU HLO module
  (`compiled.as_text()`): every instruction's `estimated_cycles` in the ENTRY computation
  and the computations it runs (while loops: the body's sum times the trip count; calls),
  fusions counted by their own estimate, not their fused instructions'.

  Returns None ("no estimate") where the text has no ENTRY computation or no estimate at
  all, or holds a construct this reader cannot bound: a conditional, an async call, a
  while loop whose trip count is neither known to the compiler nor a counter `i < N`
  stepping by 1 from a constant.
  """
  computations, entry = _parse(hlo_text)
  if entry is None or not _CYCLES.search(hlo_text):
    return None
  try:
    return _cycles(computations, entry)
  except (_Unrecognised, IndexError, AttributeError):
    return None


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo_text: str) -> dict:
  """Communication between devices the cycle estimate leaves out: {"count": collective
  instructions (all-reduce, all-gather, ...; their -start halves, a loop's counted once),
  "bytes": the bytes of their results, or None where a shape's type is not known}."""
  count, total = 0, 0
  for computation in _parse(hlo_text)[0].values():
    for opcode, body, _ in computation.values():
      if opcode.removesuffix("-start") not in _COLLECTIVES:
        continue
      count += 1
      shape = body[:_OPCODE.search(body).start()]
      for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if total is None or dtype not in _BYTES:
          total = None
          continue
        size = _BYTES[dtype]
        for d in filter(None, dims.split(",")):
          size *= int(d)
        total += size
  return {"count": count, "bytes": total}
