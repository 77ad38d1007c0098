"""`python -m mistura.cli ...` runs the `mistura` command line (as `torchrun -m mistura.cli train ...` will)."""

import sys

from mistura.cli import main

if __name__ == "__main__":
    sys.exit(main())
