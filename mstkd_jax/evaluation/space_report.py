"""What the statistics of a target space (target_space.space_statistics) tell a reader: the
collapse warning, and the rows of the report's target-space table.
"""

from __future__ import annotations

from typing import Any, Mapping

# Targets are "collapsed" when separation < COLLAPSE_MARGIN: two images of one identity are
# barely closer to each other than two images of different identities of the same group are
# (about 0.04 for the collapsed adaptor, 0.36 for a healthy one: see the module docstring of
# target_space.py).
COLLAPSE_MARGIN = 0.1

TABLE_HEADER = ["name", "within identity", "between identities (group, centroids)",
                "between images (group)", "between groups (centroids)", "separation",
                "nearest-centroid acc"]


def _is_collapsed(separation: Any, margin: float) -> bool:
  return separation is not None and float(separation) < margin


def collapse_warning(name: str, stats: Mapping[str, Any],
                     margin: float = COLLAPSE_MARGIN) -> str | None:
  """One warning line if `stats` (of target_space.space_statistics) show collapsed
  targets, else None.

  Collapsed: separation < margin overall, or in any one group of stats["per_group"] (the line
  then names the collapsed groups). Cosines are printed with 2 decimals.
  """
  margin = float(margin)
  if _is_collapsed(stats.get("separation"), margin):
    line = (f"{name}: identities barely separated in the target space (within-identity cosine "
            f"{stats['within_identity']:.2f}, "
            f"{stats['between_images_same_group']:.2f} between images of different identities "
            f"of one group ({stats['between_identities_same_group']:.2f} between their "
            f"centroids), separation "
            f"{stats['separation']:.2f} < {margin:.2f}")
    accuracy = stats.get("nearest_centroid_accuracy")
    if accuracy is not None:
      line += f"; nearest-centroid accuracy {accuracy:.2f}"
    return line + ")"
  collapsed = [(g, s) for g, s in (stats.get("per_group") or {}).items()
               if _is_collapsed(s.get("separation"), margin)]
  if not collapsed:
    return None
  parts = [f"group {g} (within-identity cosine {s['within_identity']:.2f}, between its "
           f"identities' images {s['between_images_same_group']:.2f}, separation "
           f"{s['separation']:.2f} < {margin:.2f})" for g, s in collapsed]
  noun = "group" if len(collapsed) == 1 else "groups"
  return (f"{name}: identities of {noun} {', '.join(str(g) for g, _ in collapsed)} barely "
          f"separated in the target space: {'; '.join(parts)}")


def _cell(value: Any) -> str:
  return "-" if value is None else f"{float(value):.3f}"


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of strings for a markdown table of target_space.space_statistics results.

  rows: {name: stats}, in display order. Columns: TABLE_HEADER; values with 3 decimals, "-"
  for None or a missing value.
  """
  body = []
  for name, stats in rows.items():
    body.append([str(name)] + [_cell(stats.get(key)) for key in (
        "within_identity", "between_identities_same_group", "between_images_same_group",
        "between_groups", "separation", "nearest_centroid_accuracy")])
  return list(TABLE_HEADER), body
