"""Command-line flags of the data commands (prepare, convert), with absl.

Each call of a command defines its flags on a fresh `flags.FlagValues` instead of absl's
global FLAGS: the commands then run any number of times in one process (tests, notebooks),
and next to modules that define flags of the same names globally (evaluate's --data_dir and
--name). Usage mistakes print one `error: ...` line and exit with status 2, as the project's
other commands do.
"""

import sys
from typing import Sequence

from absl import flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def usage_error(message: str):
  """Prints `error: <message>` on stderr and exits with status 2 (a usage mistake)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, prog: str,
          doc: str) -> list[str]:
  """Parses command-line arguments into `flag_values`; returns the positional ones.

  Args:
    flag_values: the command's flags, defined on a FlagValues of its own.
    argv: the arguments without the program name (sys.argv[1:]).
    prog: the program name, for the help text.
    doc: the command's description, printed above the flags by --help.

  Returns:
    The arguments that are not flags, in order.

  Raises:
    SystemExit: 0 after printing the help (-h, --help); 2 after printing one
      `error: ...` line for an unknown flag, a bad or missing value.
  """
  argv = list(argv)
  if any(a in HELP_FLAGS for a in argv):
    print(f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    sys.exit(0)
  try:
    return flag_values([prog] + argv)[1:]
  except flags.Error as e:
    usage_error(str(e).strip().replace("\n", " "))
