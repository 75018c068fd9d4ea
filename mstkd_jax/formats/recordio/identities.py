"""The identity and group names of a .rec, kept beside it in <rec>.identities.json (RecordIO
stores only numeric labels)."""

import json
import os

from mstkd_jax.errors import UserError
from mstkd_jax.formats.image_tree import DatasetIndex

NAMES_FORMAT = "mstkd_jax.identities"


def names_path_for(rec_path: str) -> str:
  """Where the identity/group names of a .rec are kept: <rec without .rec>.identities.json."""
  return os.path.splitext(os.fspath(rec_path))[0] + ".identities.json"


def write_identity_names(path: str, index: DatasetIndex):
  """Writes group and identity names (RecordIO stores only numeric labels)."""
  data = {"format": NAMES_FORMAT, "version": 1, "groups": list(index.group_names),
          "identities": [[n, g] for n, g in zip(index.identity_names, index.identity_groups)]}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False)


def read_identity_names(path: str, num_identities: int
                        ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
  """Reads (group names, identity names, identity groups) and checks them against the .rec."""
  expected = (f'expected {{"format": "{NAMES_FORMAT}", "groups": [names], "identities": '
              "[[name, group index or -1], ...]}")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read identity names ({e}); {expected}") from None
  ok = (isinstance(data, dict) and data.get("format") == NAMES_FORMAT
        and isinstance(data.get("groups"), list)
        and all(isinstance(g, str) for g in data["groups"])
        and isinstance(data.get("identities"), list))
  if ok:
    n_groups = len(data["groups"])
    for item in data["identities"]:
      if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
              and type(item[1]) is int
              and (0 <= item[1] < n_groups or (item[1] == -1 and not n_groups))):
        ok = False
        break
  if not ok:
    raise UserError(f"{path}: malformed identity names; {expected}")
  if len(data["identities"]) != num_identities:
    raise UserError(f'{path}: names {len(data["identities"])} identities but the .rec has '
                    f"{num_identities}; expected the names file written with this .rec")
  return (tuple(data["groups"]), tuple(n for n, _ in data["identities"]),
          tuple(g for _, g in data["identities"]))
