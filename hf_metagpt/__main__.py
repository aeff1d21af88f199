"""`python -m hf_metagpt ...` (also what `accelerate launch -m hf_metagpt` runs)."""

import os
import sys

from .cli import exit_now, main
from .engine.distributed import launched_processes

code = main()
if launched_processes() > 1:
    # One of several launched processes: its work is published and its process group closed.
    # Skip the interpreter's teardown, where a native thread left by an imported library was seen
    # to abort the process ("terminate called without an active exception"), failing the launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
exit_now(code)
