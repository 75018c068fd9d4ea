"""Writes requirements-dev.txt as `-r requirements.txt` plus the entries of the full lock
that requirements.txt does not hold, and drops the full lock's name (a temporary file) from
requirements.txt's "via" notes (used by .ci/lock).

An entry is a requirement line (`name==version ; marker \\`) and its indented hash and
comment lines. Every entry of requirements.txt must appear in the full lock unchanged, or
the two locks disagree on a version and this stops.

Usage: python split_lock.py FULL_LOCK REQUIREMENTS_TXT OUT
"""

import sys


def entries(path: str) -> tuple[list[str], dict[str, list[str]]]:
  """(header lines, {requirement line: its lines}) of a uv lock file."""
  header, found, current = [], {}, None
  with open(path) as f:
    for line in f:
      if line[:1].isalnum():
        current = line.rstrip(" \\\n")
        found[current] = [line]
      elif current is None:
        header.append(line)
      else:
        found[current].append(line)
  return header, found


def main(full_path: str, running_path: str, out_path: str) -> None:
  _, full = entries(full_path)
  _, running = entries(running_path)
  for key, lines in running.items():
    if key not in full:
      sys.exit(f"error: {running_path} has '{key}', which the full lock does not")
    hashes = [line for line in lines if "--hash" in line]
    if hashes != [line for line in full[key] if "--hash" in line]:
      sys.exit(f"error: '{key}' has other hashes in {running_path} than in the full lock")
  with open(running_path) as f:
    kept = [line for line in f if not line.rstrip().endswith(f"-c {full_path}")]
  with open(running_path, "w") as f:
    f.writelines(kept)
  extra = [lines for key, lines in full.items() if key not in running]
  with open(out_path, "w") as f:
    f.write("# The tests' extras, locked with the same versions as requirements.txt: made by\n"
            "#   bash .ci/lock\n"
            "# from pyproject.toml's `dev` extra. Do not edit by hand.\n"
            "-r requirements.txt\n")
    for lines in extra:
      f.writelines(lines)


if __name__ == "__main__":
  main(*sys.argv[1:])
