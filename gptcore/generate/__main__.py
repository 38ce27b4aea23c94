"""python -m gptcore.generate (gptcore.generate.cli)."""
import sys

from gptcore.generate.cli import main

sys.exit(main())
