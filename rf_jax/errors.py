"""The one base class of the user's mistakes.

The CLI prints a `UserError` as one `error: ...` line (exit status 1) and lets anything else
keep its traceback: an error that escapes without this base is a bug in rf_jax.
"""


class UserError(Exception):
  """A mistake the user can fix; its message names the file, line, config key or path and says
  what to do."""
