"""torchbragg: a vectorised PyTorch re-implementation of nanoBragg.

>>> import torchbragg
>>> sim = torchbragg.Simulation.from_args(torchbragg.TAP_CONFIG_ARGS)
>>> image = sim.render()          # torch.Tensor [slow, fast], photons per pixel
"""

import os as _os
import sys as _sys


def _quiet_exit(signum, frame):  # pragma: no cover - exercised by scripts/interrupt_trial.py
    """Before the command's own handlers (start-up) and after its work: one line, exit 130/143."""
    what, code = ("terminated", 143) if signum == 15 else ("interrupted", 130)
    prog = "bragg-tap" if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "bragg-tap" else "torchbragg"
    done = getattr(_sys.modules.get("torchbragg.cli.command"), "_OUTPUTS_WRITTEN", False)
    _os.write(2, f"{prog}: {what}; {'after its files were written' if done else 'no output file was changed'}\n"
              .encode())
    _os._exit(code)


if _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("torchbragg", "bragg-tap"):
    # started as a command: a signal during the imports below ends it with one line, no traceback
    import signal as _signal

    _signal.signal(_signal.SIGINT, _quiet_exit)
    _signal.signal(_signal.SIGTERM, _quiet_exit)

from .arguments import ArgumentError, parse_args
from .config import (
    TAP_CONFIG_ARGS,
    BeamConfig,
    CompatConfig,
    CrystalConfig,
    DetectorConfig,
    OutputConfig,
    SamplingConfig,
    SimulationConfig,
)
from .resolve import SetupError
from .simulation import FallbackMap, RenderCancelled, Simulation

__version__ = "0.1.0"

__all__ = [
    "Simulation", "SimulationConfig", "DetectorConfig", "BeamConfig", "CrystalConfig", "SamplingConfig",
    "OutputConfig", "CompatConfig", "parse_args", "ArgumentError", "SetupError", "RenderCancelled",
    "FallbackMap", "TAP_CONFIG_ARGS",
]
