"""One helper the tests share: a run refused with one clear error before it writes anything."""
import os

import pytest

from clmim import main as clmim_main
from clmim.errors import ClmimError


def listing(root):
  """Every path under `root`, relative to it, sorted."""
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, dirs, files in os.walk(root) for f in files + dirs)


def refused(config, workdir, *fragments, root=None):
  """Runs `config` through `clmim.main.run` (what the command line runs after parsing flags):
  expects one ClmimError on one line containing every fragment (the command line prints it as
  its one `clmim: error:` line, exit status 1; any other exception would be a traceback), and
  nothing new under `root` (default: the workdir's parent). Returns the message."""
  root = root or os.path.dirname(str(workdir))
  before = listing(root)
  with pytest.raises(ClmimError) as error:
    clmim_main.run(config, str(workdir))
  message = str(error.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message
  assert listing(root) == before
  return message
