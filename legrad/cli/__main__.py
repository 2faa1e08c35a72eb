"""``python -m legrad.cli`` runs the command line (same as ``python -m legrad``)."""

import sys

from legrad.cli import main

sys.exit(main())
