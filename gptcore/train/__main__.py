"""python -m gptcore.train: see gptcore.train's module doc (or --help)."""
import sys

from gptcore.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
