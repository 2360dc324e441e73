"""`python -m moe ...` (and `torchrun -m moe ...`) is the `moe` command."""

import sys

from moe.app.cli import main

sys.exit(main())
