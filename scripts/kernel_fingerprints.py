"""Fingerprints of the compiled kernels' images, to show a refactor changed no bit.

Renders every golden case (``../shared/golden``, or the small copies in
``tests/data/golden_small``) and a set of small configurations that reach every
variant of the compiled kernels (crystal shapes, -oversample_* flags, curved and
thick detectors, -dmin, interpolation, fallback counting), in float32 and
float64, with the fused CPU kernel and with the host build of the GPU kernel.
Prints one line per render: the SHA-256 of the image bytes and, for fallback
renders, of the counts and reasons. Run it before and after a change and
compare the outputs with ``diff``::

    .venv/bin/python scripts/kernel_fingerprints.py > before.txt
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import torchbragg

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "golden"
SMALL = ROOT / "tests" / "data" / "golden_small"

#: the tap configuration (torchbragg.TAP_CONFIG_ARGS) at 40x40 pixels
TAP = [("40" if prev == "-detpixels" else a)
       for prev, a in zip([""] + torchbragg.TAP_CONFIG_ARGS, torchbragg.TAP_CONFIG_ARGS, strict=False)]
BUSY = ["-mosaic", "0.5", "-mosaic_domains", "3", "-phi", "0", "-osc", "0.2", "-phisteps", "2",
        "-dispersion", "0.1", "-dispsteps", "2", "-detector_thick", "100", "-detector_thicksteps", "2",
        "-detector_abs", "300", "-polar", "0.8", "-dmin", "2.5"]
EXTRA = {
    "square": TAP + BUSY,
    "round": TAP + BUSY + ["-round_xtal"],
    "gauss": TAP + BUSY + ["-gauss_xtal"],
    "tophat": TAP + BUSY + ["-tophat_spots"],
    "over_thick": TAP + BUSY + ["-oversample_thick"],
    "over_polar_omega": TAP + BUSY + ["-oversample_polar", "-oversample_omega"],
    "curved": TAP + ["-curved_det", "-detector_thick", "50", "-detector_thicksteps", "2"],
    "point_pixel": TAP + ["-point_pixel", "-nopolar"],
}


def cases():
    root = SHARED if (SHARED / "cases.json").is_file() else SMALL
    for name, entry in json.loads((root / "cases.json").read_text()).items():
        folder = root / "cases" / name
        args = list(entry["args"])
        copy = [p for p in folder.iterdir() if p.suffix in (".hkl", ".mat")]
        if name == "stale_fdump":
            args += ["-use_fdump"]
            copy.append(folder / "Fdump.bin")
        yield name, args, copy
    for name, args in EXTRA.items():
        yield name, args, []


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def gpu_host_plan(sim):
    try:
        from torchbragg.kernels.gpu import GpuPlan
    except ImportError:  # the flat layout before torchbragg.kernels existed
        from torchbragg.gpu_kernel import GpuPlan
    plan = GpuPlan(sim._tensors, emulate=True, **sim.plan_arguments())
    # _fast_plan_cache: the name before the rebuild
    sim.__dict__["_compiled_plan_cache"] = sim.__dict__["_fast_plan_cache"] = (plan,)
    return plan


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, copy in cases():
            folder = Path(tmp) / name
            folder.mkdir()
            for p in copy:
                shutil.copyfile(p, folder / p.name)
            for dtype in (torch.float32, torch.float64):
                for kernel in ("cpu", "gpu-host"):
                    for fallback in (False, True):
                        sim = torchbragg.Simulation.from_args(args, cwd=folder, dtype=dtype)
                        if kernel == "gpu-host":
                            gpu_host_plan(sim)
                        if fallback:
                            image, fb = sim.render_with_fallback()
                            extra = f" counts {digest(fb.counts)} reasons {digest(fb.reason)}"
                        else:
                            image, extra = sim.render(), ""
                        label = f"{name} {str(dtype)[6:]} {kernel} {'fallback' if fallback else 'image'}"
                        print(f"{label:50s} {sim.last_kernel:22s} {digest(image)}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
