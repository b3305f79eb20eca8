"""bragg_inspector: a napari plugin for looking inside torchbragg simulations.

Thin layer, no physics: renders, taps, F lookups and image comparison all come
from the ``torchbragg`` engine.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Inspector", "InspectorModel", "__version__"]


def __getattr__(name):  # keep ``import bragg_inspector`` light (npe2 imports it)
    if name == "Inspector":
        from .inspector import Inspector

        return Inspector
    if name == "InspectorModel":
        from .model import InspectorModel

        return InspectorModel
    raise AttributeError(name)
