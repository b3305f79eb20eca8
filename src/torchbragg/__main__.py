"""``python -m torchbragg`` runs the ``torchbragg`` command."""

import sys

from .cli import main

sys.exit(main())
