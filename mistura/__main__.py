"""`python -m mistura ...` runs the `mistura` command line, as `torchrun -m mistura train ...` does."""

import sys

from mistura.cli import main

if __name__ == "__main__":
    sys.exit(main())
