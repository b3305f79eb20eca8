"""The Qt layer of the inspector: magicgui panels and the render worker.

Everything here only builds widgets and wires signals to the Qt-free
controller (:mod:`bragg_inspector.controller`) and model.
"""

from .simulation_panel import SimulationPanel
from .tap_panel import TapPanel

__all__ = ["SimulationPanel", "TapPanel"]
