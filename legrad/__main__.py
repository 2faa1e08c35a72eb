"""``python -m legrad`` runs the command line."""

import sys

from legrad.cli import main

sys.exit(main())
