"""The one exception type for problems a user can fix (bad data, config, checkpoint).

`main` and the other command-line entry points print its message alone, without a
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem in the user's input; the message names the file or field and what was expected."""
