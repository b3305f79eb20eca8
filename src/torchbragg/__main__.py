"""``python -m torchbragg`` runs the ``torchbragg`` command."""

import sys

from .cli.command import main

sys.exit(main())
