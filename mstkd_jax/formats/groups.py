"""The demographic group of each identity, from a file: for training sets that carry none.

A stock insightface train.rec (or a flat image tree) has no groups, so a teacher of one
group cannot be trained from it. `python -m mstkd_jax.formats.prepare --groups=FILE` names
each identity's group with one of:

* a CSV or TSV file, one identity a line, `identity,group` (or tab- or space-separated);
  blank lines and lines starting with "#" are skipped, and a first line `identity,group`
  is taken as a header;
* a JSON object {identity: group}, or {group: [identity, ...]} (per-group lists);
* a folder of per-group lists, `<group>.txt` (or .csv, .lst) each naming its identities,
  one a line (the first field of the line; BUPT-style per-race identity lists).

An identity is named as the data set names it: its folder name in an image tree, the name
in <rec>.identities.json for a RecordIO that has one, else its label, written with or
without leading zeros ("7" and "00007" both name label 7). Every identity of the data must
have a group; names of the file that the data does not hold are counted in a warning (a
subset of a larger list is fine).
"""

import csv
import json
import os
from typing import Sequence

from mstkd_jax.errors import UserError

LIST_EXTENSIONS = (".txt", ".csv", ".lst")
_EXPECTED = ("expected a CSV `identity,group` a line, a JSON {identity: group} or "
             "{group: [identities]}, or a folder of <group>.txt identity lists")


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--groups={path}: cannot read it ({e}); {_EXPECTED}") from e


def _add(mapping: dict, identity: str, group: str, where: str) -> None:
  identity, group = identity.strip(), group.strip()
  if not identity or not group:
    raise UserError(f"{where}: an empty identity or group name; {_EXPECTED}")
  if identity in mapping and mapping[identity] != group:
    raise UserError(f"{where}: identity {identity!r} is given group {group!r} and also "
                    f"{mapping[identity]!r}; expected one group per identity")
  mapping[identity] = group


def _from_json(path: str, text: str) -> dict[str, str]:
  try:
    value = json.loads(text)
  except ValueError as e:
    raise UserError(f"--groups={path}: not valid JSON ({e})") from e
  if not isinstance(value, dict) or not value:
    raise UserError(f"--groups={path}: a JSON {type(value).__name__}; {_EXPECTED}")
  mapping: dict[str, str] = {}
  for key, item in value.items():
    if isinstance(item, str):
      _add(mapping, key, item, f"--groups={path} entry {key!r}")
    elif isinstance(item, list) and all(isinstance(i, (str, int)) for i in item):
      for identity in item:
        _add(mapping, str(identity), key, f"--groups={path} group {key!r}")
    else:
      raise UserError(f"--groups={path} entry {key!r}: {item!r}; expected a group name "
                      "(identity -> group) or a list of identities (group -> identities)")
  return mapping


def _from_csv(path: str, text: str) -> dict[str, str]:
  mapping: dict[str, str] = {}
  lines = text.splitlines()
  sample = next((line for line in lines if line.strip() and not line.startswith("#")), "")
  delimiter = "," if "," in sample else ("\t" if "\t" in sample else None)
  for number, line in enumerate(lines, start=1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    fields = (next(csv.reader([line], delimiter=delimiter)) if delimiter
              else line.split())
    fields = [f.strip() for f in fields]
    if number == 1 and [f.lower() for f in fields] == ["identity", "group"]:
      continue
    if len(fields) != 2:
      raise UserError(f"--groups={path} line {number}: {line.strip()!r} has {len(fields)} "
                      "fields; expected `identity,group`")
    _add(mapping, fields[0], fields[1], f"--groups={path} line {number}")
  return mapping


def _from_folder(path: str) -> dict[str, str]:
  mapping: dict[str, str] = {}
  names = sorted(n for n in os.listdir(path)
                 if os.path.splitext(n)[1].lower() in LIST_EXTENSIONS and not n.startswith("."))
  for name in names:
    group = os.path.splitext(name)[0]
    file = os.path.join(path, name)
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
      fields = line.replace(",", " ").split()
      if fields and not fields[0].startswith("#"):
        _add(mapping, fields[0], group, f"--groups={file} line {number}")
  return mapping


def read_groups_file(path: str) -> dict[str, str]:
  """{identity name: group name} of a groups file or folder (module docstring).

  Raises:
    UserError: naming the file (and line or entry): missing, unreadable, malformed, empty,
      or an identity given two groups.
  """
  if os.path.isdir(path):
    mapping = _from_folder(path)
  elif os.path.isfile(path):
    text = _read_text(path)
    mapping = _from_json(path, text) if text.lstrip().startswith("{") else _from_csv(path, text)
  else:
    raise UserError(f"--groups={path}: does not exist; {_EXPECTED}")
  if not mapping:
    raise UserError(f"--groups={path}: names no identity; {_EXPECTED}")
  return mapping


def _key(name: str) -> str:
  """Label names compare as numbers ("00007" == "7")."""
  return str(int(name)) if name.isascii() and name.isdigit() else name


def assign_groups(path: str, identity_names: Sequence[str]
                  ) -> tuple[tuple[str, ...], tuple[int, ...], int]:
  """The groups of a data set's identities, from a groups file.

  Args:
    path: the --groups file or folder.
    identity_names: the data set's name of every identity label.

  Returns:
    (sorted group names, the group index of every identity label, how many identities of
    the file the data set does not hold).

  Raises:
    UserError: the file is refused by `read_groups_file`, or identities of the data set
      have no group in it (naming how many and the first few).
  """
  mapping = {_key(k): v for k, v in read_groups_file(path).items()}
  found = [mapping.get(_key(name)) for name in identity_names]
  missing = [name for name, group in zip(identity_names, found) if group is None]
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                      else "")
    raise UserError(f"--groups={path}: no group for {len(missing)} of the "
                    f"{len(identity_names)} identities of the data set ({shown}); expected "
                    "every identity named, by its folder name, identities.json name or label")
  extra = len(set(mapping) - {_key(name) for name in identity_names})
  group_names = tuple(sorted(set(found)))
  index = {g: i for i, g in enumerate(group_names)}
  return group_names, tuple(index[g] for g in found), extra
