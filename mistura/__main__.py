"""`python -m mistura ...` runs the `mistura` command line (and `torchrun -m mistura train ...` with it)."""

import sys

from mistura.cli import main

if __name__ == "__main__":
    sys.exit(main())
