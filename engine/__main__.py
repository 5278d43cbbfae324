"""`python -m engine` is the `nudge` command."""

import sys

from engine.cli import main

sys.exit(main())
