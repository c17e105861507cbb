"""The one exception type users see.

Anything wrong with user input (a file, a config field, a model name, a dataset) raises
`ClmimError` with a message that names the culprit and says what was expected. `clmim.main`
prints such errors as one line and exits non-zero instead of showing a traceback.
"""


class ClmimError(Exception):
  """A user-facing error: bad input, named precisely, with what was expected."""
