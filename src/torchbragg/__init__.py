"""torchbragg: a vectorised PyTorch re-implementation of nanoBragg.

>>> import torchbragg
>>> sim = torchbragg.Simulation.from_args(torchbragg.TAP_CONFIG_ARGS)
>>> image = sim.render()          # torch.Tensor [slow, fast], photons per pixel
"""

from .arguments import ArgumentError, parse_args
from .config import (TAP_CONFIG_ARGS, BeamConfig, CompatConfig, CrystalConfig, DetectorConfig, OutputConfig,
                     SamplingConfig, SimulationConfig)
from .setup import SetupError
from .simulation import FallbackMap, RenderCancelled, Simulation

__version__ = "0.1.0"

__all__ = [
    "Simulation", "SimulationConfig", "DetectorConfig", "BeamConfig", "CrystalConfig", "SamplingConfig",
    "OutputConfig", "CompatConfig", "parse_args", "ArgumentError", "SetupError", "RenderCancelled",
    "FallbackMap", "TAP_CONFIG_ARGS",
]
