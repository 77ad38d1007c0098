"""`python -m mistura.cli ...` runs the `mistura` command line (the same as `python -m mistura ...`)."""

import sys

from mistura.cli import main

if __name__ == "__main__":
    sys.exit(main())
