"""Repository-wide test set-up.

pytest puts ``tests/`` on ``sys.path`` because of this file, and ``tests/torchbragg``
(a folder without ``__init__.py``) would then be importable as a namespace package
called ``torchbragg``, shadowing the real package of an editable install (whose
finder runs after the path finder).  Putting ``src/`` on the path as well makes
the import system find the real package first: a regular package anywhere on the
path wins over a namespace portion.  It also lets the tests run from a plain
checkout without installing the package.
"""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "torchbragg" / "__init__.py").is_file() and str(SRC) not in sys.path:
    sys.path.append(str(SRC))
