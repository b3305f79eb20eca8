"""The render kernels: the eager PyTorch kernel and the compiled CPU and GPU kernels.

- :mod:`.eager`: the readable reference, every evaluation as tensors; taps use it
  and the compiled kernels are tested against it;
- :mod:`.packing`: the parameters of one simulation packed for the compiled kernels;
- :mod:`.cpu`, :mod:`.gpu`: the plans that run ``cpu_render.cpp`` and ``gpu_render.cu``,
  whose per-evaluation physics is one header, ``kernel_math.h``;
- :mod:`.cpu_adjoint`: ``cpu_adjoint.cpp``, the compiled backward pass of a CPU render;
- :mod:`.build`: compiler, sources and the on-disk cache;
- :mod:`.row_stats`: the per-row statistics the compiled kernels return;
- :mod:`.reasons`: the structure-factor lookup reasons.
"""

from .eager import BlockResult, KernelTensors, evaluate_block
from .packing import KernelParameters, compiled_kernels_unsupported, fallback_count_dtype
from .reasons import FALLBACK_REASONS, LOOKUP_CODES, LOOKUP_REASONS

__all__ = ["KernelTensors", "BlockResult", "evaluate_block", "KernelParameters", "compiled_kernels_unsupported",
           "fallback_count_dtype", "LOOKUP_REASONS", "LOOKUP_CODES", "FALLBACK_REASONS"]
