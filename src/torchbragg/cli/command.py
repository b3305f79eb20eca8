"""The ``torchbragg`` command: a drop-in for the nanoBragg program.

``torchbragg <nanoBragg arguments> [-device cpu|cuda] [-dtype float32|float64]``
renders like the C program, prints the same statistics and writes the files it
is asked for (``-floatfile``, ``-intfile``, ``-noisefile``, ``-pgmfile``).

Subcommands: ``torchbragg compare REF OUT`` (image metrics) and
``torchbragg bench`` (speed and memory figures).
"""

from __future__ import annotations

import io
import math
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

__all__ = ["main", "run_simulation", "split_engine_options", "TerminalProgress"]

USAGE = """usage: torchbragg <nanoBragg arguments> [-device cpu|cuda] [-dtype float32|float64] [-chunk_rows N]
       torchbragg compare REF OUT [--shape SLOW FAST] [--json]
       torchbragg bench [--help]
       torchbragg defaultf-map --renderer PROGRAM [--out DIR] [--list N] [--no-engine] [--timeout S]
                               -- <nanoBragg arguments>
       torchbragg fit REF --params distance,beam_center,misset [--roi XMIN XMAX YMIN YMAX] [--out DIR]
                      [--loss lsq|poisson] [--max-iter N] -- <nanoBragg arguments>
       torchbragg --help-flags        (every nanoBragg flag this engine understands)

example:
  torchbragg -cell 100 100 100 90 90 90 -N 5 -default_F 100 -lambda 0.5 \\
      -distance 500 -pixel 0.05 -detpixels 4096 -oversample 2 -floatfile out.bin"""


class TerminalProgress:
    """A one-line progress bar on a terminal (silent when not a terminal).

    An instance is the ``progress`` callback of a render: calling it with ``(done, total)`` redraws
    the bar with the percentage done and the seconds since the instance was made.

    Parameters
    ----------
    stream : TextIO, optional
        Where the bar is written (standard error by default); nothing is written unless its ``isatty()``
        is true.
    label : str, optional
        The word printed before the bar.

    Attributes
    ----------
    stream : TextIO
        The stream the bar is written to.
    label : str
        The word printed before the bar.
    enabled : bool
        Whether ``stream`` is a terminal (the bar is drawn only then).
    start : float
        ``time.perf_counter()`` when the instance was made, in seconds.
    """

    def __init__(self, stream: TextIO = sys.stderr, label: str = "rendering"):
        self.stream = stream
        self.label = label
        self.enabled = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        """Redraw the bar; a newline ends it once ``done`` reaches ``total``.

        Parameters
        ----------
        done : int
            The units of work finished so far.
        total : int
            The units of work in all; nothing is drawn when it is not positive.
        """
        if not self.enabled or total <= 0:
            return
        frac = done / total
        bar = "#" * int(30 * frac)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {elapsed:6.1f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def split_engine_options(argv: Sequence[str]):
    """Separate this engine's options (-device, -dtype, -chunk_rows) from nanoBragg's.

    Each option may also be spelled with two dashes and takes the next argument as its value.

    Parameters
    ----------
    argv : Sequence[str]
        The command-line arguments, nanoBragg's and this engine's mixed.

    Returns
    -------
    rest : list[str]
        The arguments that are not this engine's, in their order.
    opts : dict
        ``device`` (str, default ``"cpu"``), ``dtype`` (``"float32"`` or ``"float64"``, default
        ``"float32"``), ``chunk_rows`` (int or None) and ``dtype_given`` (the ``-dtype`` value as given, or
        None when there was none).

    Raises
    ------
    torchbragg.arguments.ArgumentError
        If an option lacks its value, the dtype is not float32/float64, the device is not one torch knows
        or is CUDA where CUDA is not available, or ``-chunk_rows`` is not an integer in 1..2**31-1.
    """
    from ..arguments import ArgumentError

    rest: list[str] = []
    opts = {"device": "cpu", "dtype": "float32", "chunk_rows": None, "dtype_given": None}
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a in ("-device", "--device", "-dtype", "--dtype", "-chunk_rows", "--chunk_rows"):
            if i + 1 >= len(argv):
                raise ArgumentError(f"{a}: expected a value")
            key = a.lstrip("-")
            opts[key] = argv[i + 1]
            if key == "dtype":
                opts["dtype_given"] = argv[i + 1]
            i += 2
            continue
        rest.append(a)
        i += 1
    if opts["dtype"] not in ("float32", "float64"):
        raise ArgumentError(f"-dtype: expected float32 or float64, got {opts['dtype']!r}")
    import torch

    try:
        device = torch.device(opts["device"])
    except RuntimeError:
        raise ArgumentError(f"-device: expected cpu, cuda or cuda:N, got {opts['device']!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"-device {opts['device']}: CUDA is not available on this machine")
    if opts["chunk_rows"] is not None:
        try:
            opts["chunk_rows"] = int(opts["chunk_rows"])
        except ValueError:
            raise ArgumentError(f"-chunk_rows: expected an integer, got {opts['chunk_rows']!r}") from None
        if not 1 <= opts["chunk_rows"] <= 2 ** 31 - 1:
            raise ArgumentError(f"-chunk_rows: expected a positive number of rows, got {opts['chunk_rows']}")
    return rest, opts


def _describe_setup(sim, out: TextIO) -> None:
    s = sim.setup
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"torchbragg {__import__('torchbragg').__version__}: nanoBragg-compatible renderer "
      f"({sim.device}, {str(sim.dtype).replace('torch.', '')})")
    p(f"{s.convention.lower()} convention selected.")
    p("pivoting detector around direct beam spot" if s.pivot == "beam" else "pivoting detector around sample")
    for line in s.log + s.notes:
        p(line)
    info = sim.hkl_info
    p(f"structure factors: {info['describe']}")
    for w in info["warnings"]:
        p(f"WARNING: {w}")
    shape_name = {"square": "parallelpiped", "round": "ellipsoidal", "gauss": "gaussian", "tophat": "tophat-spot"}
    p(f"  {shape_name[s.shape]} xtal: {s.N[0]:.0f}x{s.N[1]:.0f}x{s.N[2]:.0f} cells")
    p(f"  wave={s.lambda0:g} meters +/- {s.dispersion * 100:g}% in {s.dispsteps} steps")
    p("  polarization effect disabled" if s.nopolar else f"  Kahn polarization factor: {s.kahn:f}")
    p(f"  incident fluence: {s.fluence:g} photons/m^2")
    p(f"  distance={s.distance:g} detsize={s.detsize_f:g}x{s.detsize_s:g}  pixel={s.pixel_size:g} meters "
      f"({s.fpixels}x{s.spixels} pixels)")
    p(f"  sensor is {s.thick:g} m thick in {s.thicksteps} layers with mu= {s.mu:g}")
    p(f"  Xbeam={s.xbeam:g} Ybeam={s.ybeam:g}")
    p(f"  Fbeam={s.fbeam:g} Sbeam={s.sbeam:g}")
    p(f"  Xclose={s.xclose:g} Yclose={s.yclose:g}")
    p(f"  Fclose={s.fclose:g} Sclose={s.sclose:g}")
    p("  DIRECTION_OF_DETECTOR_X-AXIS= {:g} {:g} {:g}".format(*s.fdet))
    p("  DIRECTION_OF_DETECTOR_Y-AXIS= {:g} {:g} {:g}".format(*s.sdet))
    p("  DIRECTION_OF_DETECTOR_Z-AXIS= {:g} {:g} {:g}".format(*s.odet))
    p("  INCIDENT_BEAM_DIRECTION= {:g} {:g} {:g}".format(*s.beam))
    p("  spindle ROTATION_AXIS= {:g} {:g} {:g}".format(*s.spindle))
    p("  dials origin= {:g} {:g} {:g}".format(*s.dials_origin))
    p(f"  {len(s.source_lambdas)} sources")
    p(f"  {len(s.mosaic_umats)} mosaic domains over mosaic spread of {s.mosaic_spread * 180 / math.pi:g} degrees")
    p(f"  {s.phisteps} phi steps from {s.phi0 * 180 / math.pi:g} to {(s.phi0 + s.osc) * 180 / math.pi:g} degrees")
    extra = "".join(f" +{n}" for n, on in (("thick", s.oversample_thick), ("polar", s.oversample_polar),
                                             ("omega", s.oversample_omega)) if on)
    p(f"  {s.oversample}x{s.oversample} pixel oversample steps{extra}")
    if not sim.config.compat.phi0_reuse:
        p("  -fix_phi0: phi = 0 uses the unrotated crystal (C reuses the previous step)")
    if extra and not sim.config.compat.oversample_running_product:
        p("  -fix_oversample: each term weighted by its own oversampled factors (C multiplies the running sum)")
    elif extra:
        p("  note: as in C, the oversampled factors multiply the pixel's running sum; -fix_oversample "
          "weights each term instead")


def header_fields(sim) -> dict:
    """SMV header entries for this simulation, as C writes them.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation whose resolved set-up (in metres and radians) gives the entries.

    Returns
    -------
    dict
        The header entries from :func:`torchbragg.io.smv.smv_header_fields`, lengths in mm, the wavelength
        in Å and angles in degrees.
    """
    from ..io.smv import smv_header_fields

    s = sim.setup
    return smv_header_fields(
        pixel_size_mm=s.pixel_size * 1000.0, distance_mm=s.distance * 1000.0, wavelength_A=s.lambda0 * 1e10,
        beam_center_x_mm=s.xbeam * 1000.0, beam_center_y_mm=s.ybeam * 1000.0,
        adxv_center_mm=(s.fbeam * 1000.0, (s.detsize_s - s.sbeam) * 1000.0),
        mosflm_center_mm=((s.sbeam - 0.5 * s.pixel_size) * 1000.0, (s.fbeam - 0.5 * s.pixel_size) * 1000.0),
        denzo_beam_mm=(s.sbeam * 1000.0, s.fbeam * 1000.0), dials_origin_mm=tuple(s.dials_origin),
        xds_org_px=(s.orgx, s.orgy), close_distance_mm=s.close_distance * 1000.0,
        phi_deg=s.phi0 * 180 / math.pi, osc_range_deg=s.osc * 180 / math.pi,
        twotheta_deg=s.twotheta * 180 / math.pi)


OUTPUT_FLAGS = (("floatfile", "-floatfile"), ("intfile", "-intfile"), ("noisefile", "-noisefile"),
                ("pgmfile", "-pgmfile"), ("write_fdump", "-write_fdump"))


def check_output_paths(cfg) -> None:
    """Refuse, before any work, an output that could not be written (specs/cli.md §1.2).

    Each output file named in the configuration must lie in an existing, writable folder, not be a
    folder, not be one of the input files, and not be named twice; a temporary file is created and
    removed in its folder to prove that writing there works.

    Parameters
    ----------
    cfg : torchbragg.config.SimulationConfig
        The parsed configuration; relative paths are taken from ``cfg.cwd`` (or the current folder).

    Raises
    ------
    torchbragg.resolve.SetupError
        Naming the flag and file of the first output that could not be written.
    """
    import os

    from ..resolve import SetupError

    base = Path(cfg.cwd) if cfg.cwd else Path.cwd()

    def where(name):
        p = Path(name)
        return p if p.is_absolute() else base / p

    inputs = {}
    for flag, name in (("-hkl", cfg.crystal.hkl_path), ("-mat", cfg.crystal.matrix_path),
                       ("-mask", cfg.detector.mask_path), ("-img", cfg.output.img_header_path),
                       ("-sourcefile", cfg.beam.sourcefile)):
        if name:
            inputs[os.path.realpath(where(name))] = f"{flag} {name}"
    seen = {}
    for attr, flag in OUTPUT_FLAGS:
        name = getattr(cfg.output, attr)
        if not name:
            continue
        p = where(name)
        real = os.path.realpath(p)
        folder = Path(real).parent
        if os.path.isdir(real):
            raise SetupError(f"{flag} {name}: is a folder")
        if not folder.is_dir():
            raise SetupError(f"{flag} {name}: no such folder {folder}")
        if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(real) and not os.access(real, os.W_OK)):
            raise SetupError(f"{flag} {name}: not writable")
        if real in inputs:
            raise SetupError(f"{flag} {name}: the same file as the input {inputs[real]}")
        if real in seen:
            raise SetupError(f"{flag} {name}: the same file as {seen[real]}")
        seen[real] = f"{flag} {name}"
        try:  # os.access is not the whole truth (read-only mounts, /proc, root): try a temporary there
            from ..io.atomic_io import blocked_signals

            with blocked_signals():
                fd, probe = tempfile.mkstemp(prefix=f".{Path(real).name}.", suffix=".tmp", dir=folder)
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise SetupError(f"{flag} {name}: cannot write in {folder}: {err.strerror}") from None


def write_outputs(sim, image: np.ndarray, out: TextIO) -> None:
    """Write the files named by -floatfile/-intfile/-pgmfile/-noisefile (atomically).

    Also ``-write_fdump`` when an HKL table was read. Each file is written through
    :func:`torchbragg.io.atomic_io.atomic_write_bytes` or the writers built on it.

    Parameters
    ----------
    sim : torchbragg.Simulation
        The simulation that rendered ``image`` (its configuration names the files; its last statistics
        give the default integer and PGM scales).
    image : numpy.ndarray
        The rendered image, (slow, fast) pixels, in photons; written as little-endian float32.
    out : TextIO
        Where the ``writing ...`` lines (and the scales and noise seed used) are printed.
    """
    from ..io.atomic_io import atomic_write_bytes
    from ..io.smv import to_intimage, write_smv

    o = sim.config.output
    base = Path(sim.config.cwd) if sim.config.cwd else Path.cwd()
    img32 = np.ascontiguousarray(image, dtype="<f4")

    def where(name):
        p = Path(name)
        return p if p.is_absolute() else base / p

    if o.floatfile:
        atomic_write_bytes(where(o.floatfile), img32.tobytes())
        print(f"writing {o.floatfile} as {img32.size} 4-byte floats", file=out)
    stats = sim.last_stats
    scale = o.intfile_scale if o.intfile_scale > 0 else (55000.0 / stats.max_I if stats and stats.max_I > 0 else 1.0)
    if o.intfile:
        ints, scale = to_intimage(img32, scale, o.adc_offset)
        xmin, xmax, ymin, ymax = sim.setup.roi  # C leaves pixels outside -roi at 0
        keep = np.zeros(ints.shape, dtype=bool)
        keep[max(0, ymin):ymax + 1, max(0, xmin):xmax + 1] = True
        ints = np.where(keep, ints, 0).astype(ints.dtype)
        print(f"intfile_scale = {scale:g}", file=out)
        write_smv(where(o.intfile), ints, header_fields(sim))
        print(f"writing {o.intfile} as 2-byte integers", file=out)
    if o.pgmfile:
        from ..io.pgm import write_pgm

        pscale = o.pgm_scale if o.pgm_scale > 0 else (250.0 / (5.0 * stats.rmsd) if stats and stats.rmsd > 0 else scale)
        write_pgm(where(o.pgmfile), img32, pscale)
        print(f"pgm_scale = {pscale:g}", file=out)
        print(f"writing {o.pgmfile} as 1-byte integers", file=out)
    if o.write_fdump:
        from ..io.hkl_table import write_fdump

        if sim.setup.hkl is None:
            print(f"WARNING: -write_fdump {o.write_fdump}: no HKL table was read, nothing written", file=out)
        else:
            write_fdump(where(o.write_fdump), sim.setup.hkl)
            print(f"writing structure factors to {o.write_fdump} (Fdump.bin format)", file=out)
    if o.noisefile:
        from ..c_random import poisson_noise_image

        seed = o.seed
        if seed is None:
            seed = int(time.time())
            print(f"noise seed: {seed} (no -seed given)", file=out)
        noise, photons, overloads = poisson_noise_image(img32, seed, o.adc_offset, roi=sim.setup.roi)
        print(f"{photons:.0f} photons on noise image ({overloads} overloads)", file=out)
        write_smv(where(o.noisefile), noise, header_fields(sim))
        print(f"writing {o.noisefile} as 2-byte integers", file=out)


def run_simulation(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Render nanoBragg arguments like the C program; returns the exit code.

    Prints the set-up and the image statistics, then writes every requested file or none of them.

    Parameters
    ----------
    argv : Sequence[str]
        nanoBragg arguments, with this engine's ``-device``, ``-dtype`` and ``-chunk_rows`` among them.
    out : TextIO or None, optional
        Where the set-up, statistics and file lines are printed; ``None`` means standard output.
    err : TextIO or None, optional
        Where the progress bar is drawn; ``None`` means standard error.

    Returns
    -------
    int
        0 once the image is rendered and its files are written (errors are raised, not returned).

    Raises
    ------
    torchbragg.arguments.ArgumentError
        For arguments that cannot be parsed.
    torchbragg.resolve.SetupError
        For a set-up that cannot be rendered, an output that cannot be written, or an image with
        non-finite pixels (nothing is written then).
    torchbragg.simulation.RenderCancelled
        When the render is interrupted.
    """
    import torch

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    from ..simulation import RenderCancelled, Simulation

    global _OUTPUTS_WRITTEN
    _OUTPUTS_WRITTEN = False
    nb_args, opts = split_engine_options(argv)
    if opts["dtype_given"] is None and any(a in ("-noisefile", "-noiseimage") for a in nb_args):
        # Poisson draws branch on the exact float image: C's image is a double computation stored as
        # float, which a float64 render reproduces bit for bit and a float32 render only to a few ULPs
        opts["dtype"] = "float64"
        print("note: -noisefile: rendering in float64 so the noise image reproduces the C program's "
              "random draws (give -dtype float32 to override)", file=out)
    dtype = torch.float64 if opts["dtype"] == "float64" else torch.float32
    t0 = time.perf_counter()
    sim = Simulation.from_args(nb_args, device=opts["device"], dtype=dtype, chunk_rows=opts["chunk_rows"])
    check_output_paths(sim.config)
    _describe_setup(sim, out)
    out.flush()
    try:
        image = sim.render(progress=TerminalProgress(err))
    except KeyboardInterrupt:
        raise RenderCancelled("interrupted; nothing was written") from None
    img = image.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(img).all():  # finite flags, but intensities beyond the render's precision
        from ..resolve import SetupError

        st = sim.setup
        compounding = (any((st.oversample_thick, st.oversample_polar, st.oversample_omega))
                       and sim.config.compat.oversample_running_product)
        hint = (" or -fix_oversample (as in C, -oversample_thick/_polar/_omega multiply the running sum, "
                "which grows without bound)" if compounding else "")
        dtype_name = str(sim.dtype).replace("torch.", "")
        wider = ", give -dtype float64" if dtype_name != "float64" else ""
        n_nan = int(np.count_nonzero(np.isnan(img)))
        n_inf = int(np.count_nonzero(np.isinf(img)))
        causes = []
        if n_nan:
            causes.append(f"the arithmetic overflowed (inf - inf) for these flags: give values of smaller "
                          f"magnitude{wider}{hint}")
        if n_inf:
            causes.append(f"intensities beyond {dtype_name}: lower -fluence/-flux/-default_F/-water{wider}{hint}")
        raise SetupError(f"the image has {n_nan + n_inf} non-finite pixel(s) ({n_nan} NaN, {n_inf} infinite): "
                         f"{'; '.join(causes)}; nothing was written")
    for line in sim.last_stats.lines():
        print(line, file=out)
    if sim.config.output.printout_pixel is not None:
        from ..taps import format_tap_table

        f, s = sim.config.output.printout_pixel
        print(format_tap_table(sim.tap(s, f, taps=("hkl_subpixel", "intensity", "geometry"))), file=out)
    from ..io.atomic_io import OutputSet

    lines = io.StringIO()
    with OutputSet():  # every file or none: temporaries renamed only when all were written
        write_outputs(sim, img, lines)
    _OUTPUTS_WRITTEN = True
    out.write(lines.getvalue())
    print(f"rendered in {time.perf_counter() - t0:.2f} s", file=out)
    return 0


def _help_flags(out: TextIO) -> None:
    from ..arguments import ENGINE_FLAGS, FLAGS

    print("nanoBragg flags understood by torchbragg:", file=out)
    for name in sorted(FLAGS, key=str.lower):
        nargs, _, help_ = FLAGS[name]
        print(f"  {name:<22} {nargs} value{'s' if nargs != 1 else ' '}  {help_}", file=out)
    print("engine options:", file=out)
    for name, (nargs, help_) in ENGINE_FLAGS.items():
        print(f"  {name:<22} {nargs} value   {help_}", file=out)


_OUTPUTS_WRITTEN = False


class Terminated(BaseException):
    """SIGTERM, raised where Python next runs (like KeyboardInterrupt for SIGINT)."""


def _on_signal(signum, frame):
    # one signal ends the run: further ones are ignored so that clean-up is not cut short
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM become exceptions that the command turns into exit 130 / 143.

    SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises :class:`Terminated`; after the first signal
    both are ignored. Nothing is changed outside the main thread.
    """
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


def _after_work() -> None:
    """Once the work is done, a signal that arrives while the interpreter shuts down is ignored
    (CPython resets Python-level handlers at shutdown, so it would otherwise kill the finished run)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _one_line_warnings(prog: str) -> None:
    """A command's warnings as ``prog: warning: <message>`` lines (no source path and line)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text.startswith(f"{prog}: "):
            text = text[len(prog) + 2:]
        print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def run_command(prog: str, body, argv: Sequence[str] | None = None, aftermath=None) -> int:
    """Run a console script's ``body(argv)`` with SIGINT/SIGTERM turned into exit 130/143
    and one line on standard error (``aftermath()`` says what happened to the outputs).

    Called from Python (``argv`` given) the caller's signal handlers are restored.

    Parameters
    ----------
    prog : str
        The command's name, used in the line on standard error and in its warnings.
    body : callable
        ``body(argv) -> int``: the command's work; its return value is the exit status.
    argv : Sequence[str] or None, optional
        The arguments passed to ``body``; ``None`` means run as a console script (warnings become one-line
        messages and the signal handlers are left in place).
    aftermath : callable or None, optional
        ``aftermath() -> str``: after an interruption, what became of the outputs (appended to the line).

    Returns
    -------
    int
        ``body``'s exit status, or 130 after SIGINT and 143 after SIGTERM.
    """
    import threading

    as_command = argv is None  # called from Python (argv given): leave the caller's handlers as they were
    main_thread = threading.current_thread() is threading.main_thread()
    previous = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] if main_thread else None
    if as_command:
        _one_line_warnings(prog)
    try:
        install_signal_handlers()
        code = body(argv)
        if as_command:
            _after_work()
        return code
    except KeyboardInterrupt:
        code, what = 130, "interrupted"
    except Terminated:
        code, what = 143, "terminated"
    finally:
        if main_thread and not as_command:
            for sig, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if main_thread and as_command:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    tail = aftermath() if aftermath is not None else ""
    print(f"{prog}: {what}" + (f"; {tail}" if tail else ""), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchbragg`` console script.

    Dispatches ``compare``, ``fit``, ``bench`` and ``defaultf-map`` to their subcommands, prints the usage or the
    flag list for ``--help`` and ``--help-flags``, and otherwise renders with :func:`run_simulation`.

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        The command-line arguments (without the program name); ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success or ``--help``; 2 for no arguments (after the usage), a bad argument,
        set-up or file error; 130 when the render was cancelled or SIGINT arrived; 143 after SIGTERM;
        a subcommand's own status otherwise.
    """
    return run_command("torchbragg", _main, argv,
                       lambda: "after its files were written" if _OUTPUTS_WRITTEN else "no output file was changed")


def _main(argv: Sequence[str] | None = None) -> int:
    from ..arguments import ArgumentError
    from ..resolve import SetupError
    from ..simulation import RenderCancelled

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--help-flags":
        _help_flags(sys.stdout)
        return 0
    if argv[0] == "compare":
        from .compare import main_compare

        return main_compare(argv[1:])
    if argv[0] == "fit":
        from .fit import main as fit_main

        return fit_main(argv[1:])
    if argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "defaultf-map":
        from .defaultf_map import main as defaultf_main

        return defaultf_main(argv[1:])
    try:
        return run_simulation(argv)
    except (ArgumentError, SetupError) as err:
        print(f"torchbragg: error: {err}", file=sys.stderr)
        return 2
    except RenderCancelled as err:
        print(f"torchbragg: {err}", file=sys.stderr)
        return 130
    except (OSError, ValueError) as err:  # file formats name file, line and value
        print(f"torchbragg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
