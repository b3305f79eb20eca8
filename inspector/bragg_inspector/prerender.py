"""The launcher's first render in a separate process, started before napari.

Importing torch and rendering take about as long as napari takes to build its
window; in one process they would take turns on one interpreter.  The
launcher therefore starts ``python -m bragg_inspector.prerender`` first, which
renders with the engine and writes the image and the default_F fallback map as
``.npy`` files into a fresh temporary folder, while napari starts.  The window
shows that image as soon as it is ready; the inspector then builds its own
:class:`torchbragg.Simulation` of the same arguments in its worker thread (for
taps and the hover readout) and adopts the image (see
:meth:`bragg_inspector.controller.InspectorController.adopt_prerender`).
Anything that goes wrong in the child falls back to the panel's ordinary render,
which reports the error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["Prerender"]


def _memory_folder() -> str | None:
    """A RAM-backed temporary folder where there is one (the arrays are ~100 MB at 4096²);
    None (the usual temporary folder) otherwise, or when TMPDIR is set."""
    import os

    shm = "/dev/shm"
    if not os.environ.get("TMPDIR") and os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


class Prerender:
    """A render running in a child process.

    Parameters
    ----------
    args : list of str
        nanoBragg arguments.
    device, dtype : str
        Torch device and ``"float32"``/``"float64"`` of the render.

    Attributes
    ----------
    args : list of str
        The arguments.
    device, dtype : str
        As given.
    folder : Path
        The fresh temporary folder the child writes into.
    proc : subprocess.Popen
        The child process (``python -m bragg_inspector.prerender``).
    """

    def __init__(self, args: list[str], device: str = "cpu", dtype: str = "float32"):
        self.args, self.device, self.dtype = list(args), device, dtype
        self.folder = Path(tempfile.mkdtemp(prefix="bragg-inspector-", dir=_memory_folder()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bragg_inspector.prerender", str(self.folder), device, dtype, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def poll(self) -> bool | None:
        """None while running; True when the arrays are ready; False when it failed.

        Returns
        -------
        bool or None
            As above.
        """
        rc = self.proc.poll()
        if rc is None:
            return None
        return rc == 0 and (self.folder / "meta.json").is_file()

    def image(self) -> np.ndarray:
        """The rendered image (float32 [slow, fast]) as written by the child.

        Returns
        -------
        numpy.ndarray
            The image.
        """
        return np.load(self.folder / "image.npy")

    def fallback(self):
        """The render's default_F fallback map (an ``_engine.Fallback``).

        Returns
        -------
        Fallback
            Counts, reason codes, reason names and evaluations per pixel as written by the child.
        """
        from ._engine import Fallback

        meta = json.loads((self.folder / "meta.json").read_text())
        return Fallback(counts=np.load(self.folder / "counts.npy"), reason=np.load(self.folder / "reason.npy"),
                        reasons={int(k): v for k, v in meta["reasons"].items()},
                        evaluations_per_pixel=meta["evaluations_per_pixel"])

    def kernel(self) -> str | None:
        """Which engine kernel rendered the image (``Simulation.last_kernel`` in the child).

        Returns
        -------
        str or None
            The kernel's name.
        """
        return json.loads((self.folder / "meta.json").read_text()).get("kernel")

    def kernel_note(self) -> str | None:
        """The child's ``Simulation.last_kernel_note``: why it took the PyTorch path, or None.

        Returns
        -------
        str or None
            The note.
        """
        return json.loads((self.folder / "meta.json").read_text()).get("kernel_note")

    def result(self):
        """(image, fallback) as written by the child.

        Returns
        -------
        image : numpy.ndarray
            See :meth:`image`.
        fallback : Fallback
            See :meth:`fallback`.
        """
        return self.image(), self.fallback()

    def close(self) -> None:
        """Stop the child if it still runs and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    folder, device, dtype, *args = argv
    from . import _engine

    sim = _engine.make_simulation(args, device, dtype)
    img, fb = _engine.render(sim)
    out = Path(folder)
    np.save(out / "image.npy", img)
    np.save(out / "reason.npy", fb.reason)
    np.save(out / "counts.npy", fb.counts)
    meta = {"reasons": {str(k): v for k, v in fb.reasons.items()},
            "evaluations_per_pixel": fb.evaluations_per_pixel, "kernel": sim.last_kernel,
            "kernel_note": getattr(sim, "last_kernel_note", None)}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(out / "meta.json")  # the marker that everything else is written
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - the parent renders again and reports the error
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
