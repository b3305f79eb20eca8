"""Where a renderer uses default_F, measured from outside.

``torchbragg defaultf-map --renderer PROGRAM [--out DIR] [--list N] -- <nanoBragg args>``
runs PROGRAM twice, each in its own empty temporary folder (no stale
``Fdump.bin``), with ``-default_F D`` and ``-default_F 1000*D`` (D = the
arguments' default_F when positive, else 1), ``-floatfile`` into that folder
and no other output.  A pixel whose value changes took default_F in at least
one evaluation that contributes.  The result is compared with the engine's
exact fallback map (:meth:`Simulation.render_with_fallback`).

What the method cannot see: an evaluation whose contribution is zero
(polarisation, solid angle or capture fraction exactly 0, or a term that
underflows) changes nothing when default_F changes; such pixels are counted
as ``only_engine``.  Evaluations with F_latt = 0 are skipped by the engine and
not counted in its map either, so they cause no disagreement.  Interpolated
lookups (reason ``interpolated``) whose 4x4x4 neighbourhood holds unlisted
cells (filled with default_F) do change, and count as ``only_measured``.

:func:`compare_fallback` and :func:`fallback_labels` compare two maps (boolean
masks or reason-code arrays) without Qt.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DefaultFMapError", "compare_fallback", "fallback_labels", "measure_defaultf_map",
           "renderer_args", "write_result"]

SCHEMA = "torchbragg-defaultf-map/1"
MASK_FILE = "defaultf_mask.u8"
ENGINE_FILE = "engine_reason.u8"
RATIO = 1000.0
INPUT_FLAGS = {"-hkl", "-mat", "-mask", "-sourcefile", "-img", "-stol", "-4stol", "-Q"}
OUTPUT_FLAGS = {"-floatfile", "-floatimage", "-intfile", "-intimage", "-noisefile", "-noiseimage",
                "-pgmfile", "-pgmimage", "-write_fdump", "-stolout", "-printout_pixel", "-default_F"}
ENGINE_OPTIONS = {"-device": 1, "--device": 1, "-dtype": 1, "--dtype": 1, "-chunk_rows": 1, "--chunk_rows": 1}


class DefaultFMapError(ValueError):
    """A default_F measurement that cannot be made (bad program, failed run, wrong image size)."""


# ----------------------------------------------------------------- map comparison
def _as_mask(a) -> np.ndarray:
    arr = np.asarray(a)
    return arr.astype(bool) if arr.dtype != bool else arr


def compare_fallback(current, reference) -> dict[str, object]:
    """Count agreement of two default_F maps.

    Parameters
    ----------
    current, reference : numpy.ndarray
        ``[slow, fast]`` boolean masks or reason codes (0 = no default_F,
        1-3 = the FallbackMap reasons); same shape.

    Returns
    -------
    dict
        ``both``, ``only_current``, ``only_reference``, ``neither``,
        ``reason_changed`` (both used default_F, reason codes differ; 0 for
        boolean masks), ``shape`` [slow, fast].
    """
    cur, ref = np.asarray(current), np.asarray(reference)
    if cur.shape != ref.shape:
        raise ValueError(f"fallback maps differ in shape: {cur.shape} and {ref.shape}")
    c, r = _as_mask(cur), _as_mask(ref)
    both = c & r
    changed = both & (cur.astype(np.int64) != ref.astype(np.int64)) if cur.dtype != bool and ref.dtype != bool \
        else np.zeros_like(both)
    return {"both": int(both.sum()), "only_current": int((c & ~r).sum()),
            "only_reference": int((~c & r).sum()), "neither": int((~c & ~r).sum()),
            "reason_changed": int(changed.sum()), "shape": [int(n) for n in cur.shape]}


def fallback_labels(current, reference) -> np.ndarray:
    """uint8 label image: 0 neither, 1 both, 2 only current, 3 only reference, 4 both with the reason changed.

    Parameters
    ----------
    current, reference : numpy.ndarray
        ``[slow, fast]`` boolean masks or reason codes (non-zero = default_F used); same shape.

    Returns
    -------
    numpy.ndarray
        uint8 ``[slow, fast]`` labels as above; label 4 is given only when both maps are
        reason codes (not boolean).

    Raises
    ------
    ValueError
        When the two maps differ in shape.
    """
    cur, ref = np.asarray(current), np.asarray(reference)
    if cur.shape != ref.shape:
        raise ValueError(f"fallback maps differ in shape: {cur.shape} and {ref.shape}")
    c, r = _as_mask(cur), _as_mask(ref)
    out = np.zeros(cur.shape, dtype=np.uint8)
    out[c & r] = 1
    out[c & ~r] = 2
    out[~c & r] = 3
    if cur.dtype != bool and ref.dtype != bool:
        out[c & r & (cur.astype(np.int64) != ref.astype(np.int64))] = 4
    return out


# ----------------------------------------------------------------- measurement
def _walk(argv: Sequence[str]) -> list[list[str]]:
    """Split a validated nanoBragg argument list into [flag, values...] groups."""
    from .arguments import FLAGS, count_numbers

    groups, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag in ENGINE_OPTIONS:
            n = 1
        elif flag == "-cell":
            n = count_numbers(argv, i + 1, 6)
        elif flag == "-misset" and i + 1 < len(argv) and argv[i + 1].lower().startswith("rand"):
            n = 1
        else:
            n = FLAGS[flag][0]
        groups.append(list(argv[i:i + 1 + n]))
        i += 1 + n
    return groups


def renderer_args(args: Sequence[str], default_F: float, floatfile: str, cwd: str | None = None) -> list[str]:
    """The user's nanoBragg arguments for one measurement run.

    Input files become absolute paths (relative to ``cwd``), output flags and
    ``-default_F`` are removed, then ``-default_F``, ``-floatfile`` and
    ``-nonoise -nopgm`` are appended (nanoBragg-compatible flags).

    Parameters
    ----------
    args : sequence of str
        The user's nanoBragg arguments (already validated: every flag is known).
    default_F : float
        The ``-default_F`` value of this run.
    floatfile : str
        File name given to ``-floatfile`` (relative to the run's working folder).
    cwd : str, optional
        Folder that relative input file names are resolved against; the current
        folder when omitted.

    Returns
    -------
    list of str
        The argument list for the renderer.
    """
    base = Path(cwd or os.getcwd())
    out: list[str] = []
    for g in _walk(list(args)):
        if g[0] in OUTPUT_FLAGS:
            continue
        if g[0] in INPUT_FLAGS and len(g) == 2:
            g = [g[0], str((base / g[1]).resolve())]
        out.extend(g)
    return out + ["-default_F", f"{default_F:g}", "-floatfile", floatfile, "-nonoise", "-nopgm"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(program: list[str], args: list[str], shape: tuple[int, int], log,
         timeout: float | None = None) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="defaultf-") as tmp:
        cmd = program + args
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DefaultFMapError(f"{program[0]} ran past --timeout {timeout:g} s (stopped): "
                                   f"{shlex.join(cmd)}") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            raise DefaultFMapError(f"{shlex.join(cmd)}: exit {proc.returncode}: {last}")
        img = Path(tmp) / args[args.index("-floatfile") + 1]
        if not img.exists():
            raise DefaultFMapError(f"{program[0]} wrote no float image {img.name}")
        n = img.stat().st_size // 4
        if n != shape[0] * shape[1]:
            raise DefaultFMapError(f"{program[0]} wrote {n} floats; the arguments give {shape[0]}x{shape[1]} "
                                   f"= {shape[0] * shape[1]} pixels")
        return np.fromfile(img, dtype="<f4").reshape(shape)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ~((a == b) | (np.isnan(a) & np.isnan(b)))


def measure_defaultf_map(program: str, args: Sequence[str], *, cwd: str | None = None, list_n: int = 20,
                         compare_engine: bool = True, log=None, timeout: float | None = None
                         ) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Measure PROGRAM's default_F map for nanoBragg ``args``.

    Each of the two runs is stopped (an error) after ``timeout`` seconds when given.

    Parameters
    ----------
    program : str
        The renderer's command line (split like a shell would); its first word is an
        executable on ``PATH`` or a path to one.
    args : sequence of str
        nanoBragg arguments; engine options (``-device``, ``-dtype``, ``-chunk_rows``)
        set the engine's device and dtype for the comparison.
    cwd : str, optional
        Folder that relative input file names are resolved against.
    list_n : int
        The most disagreeing pixels listed in ``summary["engine"]["disagreements"]``.
    compare_engine : bool
        Also render the engine's fallback map and compare it with the measured one.
    log : callable, optional
        Called with each progress message (str); by default messages go to stderr.
    timeout : float, optional
        Seconds each renderer run may take (s); no limit when omitted.

    Returns
    -------
    mask : numpy.ndarray
        uint8 ``[slow, fast]``, 1 where the pixel changed.
    summary : dict
        The summary.json document (without ``mask_file``).
    engine_reason : numpy.ndarray or None
        The engine's reason codes (uint8 [slow, fast]) when compared.
    """
    import torch

    from .simulation import Simulation

    log = log or (lambda msg: print(f"defaultf-map: {msg}", file=sys.stderr))
    prog = shlex.split(program)
    if not prog:
        raise DefaultFMapError("--renderer: empty program")
    exe = shutil.which(prog[0]) if os.sep not in prog[0] else prog[0]
    if not exe or not os.access(exe, os.X_OK):
        raise DefaultFMapError(f"--renderer {prog[0]}: not an executable program")
    exe = str(Path(exe).resolve())
    if os.sep in prog[0]:
        prog[0] = str(Path(prog[0]).absolute())
    engine_opts, nb = {}, []
    i, args = 0, list(args)
    while i < len(args):
        if args[i] in ENGINE_OPTIONS and i + 1 < len(args):
            engine_opts[args[i].lstrip("-")] = args[i + 1]
            i += 2
            continue
        nb.append(args[i])
        i += 1
    from .arguments import parse_args

    cfg = parse_args(nb)
    d0 = float(cfg.crystal.default_F or 0.0)
    low = d0 if d0 > 0 else 1.0
    values = [low, low * RATIO]
    run_args = [renderer_args(list(args), v, "float.bin", cwd) for v in values]
    dtype = torch.float64 if engine_opts.get("dtype") == "float64" else torch.float32
    sim = Simulation.from_args(_engine_args(run_args[0]), device=engine_opts.get("device", "cpu"),
                               dtype=dtype, cwd=cwd)
    shape = tuple(int(n) for n in sim.shape)
    images = []
    for k, ra in enumerate(run_args):
        log(f"run {k + 1}/2: -default_F {values[k]:g}")
        images.append(_run(prog, ra, shape, log, timeout))
    changed = _changed(images[0], images[1])
    mask = changed.astype(np.uint8)
    summary = {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "program": {"command": prog, "path": exe, "sha256": _sha256(Path(exe))},
        "args": list(args),
        "default_F": values,
        "commands": [prog + ra for ra in run_args],
        "shape": list(shape),
        "mask_layout": "uint8 [slow, fast], 1 = pixel changed with default_F",
        "counts": {"changed": int(changed.sum()), "total": int(changed.size)},
    }
    reason = None
    if compare_engine:
        log("engine fallback map")
        _, fb = sim.render_with_fallback()
        reason = fb.reason.cpu().numpy().astype(np.uint8)
        counts = fb.counts.cpu().numpy()
        engine = counts > 0
        cmp = compare_fallback(changed, engine)
        bad = np.argwhere(changed != engine)
        summary["engine"] = {
            "dtype": str(dtype).replace("torch.", ""),
            "fallback_pixels": int(engine.sum()),
            "agree": cmp["both"] + cmp["neither"], "both": cmp["both"], "neither": cmp["neither"],
            "only_measured": cmp["only_current"], "only_engine": cmp["only_reference"],
            "disagreements": [{"slow": int(s), "fast": int(f), "measured": bool(changed[s, f]),
                               "engine_reason": int(reason[s, f])} for s, f in bad[:max(0, list_n)]],
            "reason_pixels": fb.pixel_counts(),
        }
    return mask, summary, reason


def _engine_args(run_args: list[str]) -> list[str]:
    """The measurement arguments minus the renderer-only output flags (first run's default_F kept)."""
    i = run_args.index("-floatfile")
    return run_args[:i] + run_args[i + 2:]


def write_result(folder, mask: np.ndarray, summary: dict, reason: np.ndarray | None) -> Path:
    """Create ``folder`` (it must not exist) and write the mask, engine map and summary.json (last).

    Parameters
    ----------
    folder : str or os.PathLike
        The folder to create.
    mask : numpy.ndarray
        The measured mask (written as uint8 bytes to ``defaultf_mask.u8``).
    summary : dict
        The summary document; ``mask_file`` (and ``engine_reason_file`` with a
        reason map) are added before it is written as ``summary.json``.
    reason : numpy.ndarray or None
        The engine's reason codes (written as uint8 bytes to ``engine_reason.u8``), or None.

    Returns
    -------
    pathlib.Path
        The created folder.

    Raises
    ------
    DefaultFMapError
        When ``folder`` already exists.
    """
    from .io.atomic_io import atomic_write_bytes, atomic_write_text

    d = Path(folder)
    try:
        d.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise DefaultFMapError(f"--out {d}: already exists; give a new folder") from None
    atomic_write_bytes(d / MASK_FILE, np.ascontiguousarray(mask, dtype=np.uint8).tobytes(), overwrite=False)
    summary = dict(summary, mask_file=MASK_FILE)
    if reason is not None:
        atomic_write_bytes(d / ENGINE_FILE, np.ascontiguousarray(reason, dtype=np.uint8).tobytes(), overwrite=False)
        summary["engine_reason_file"] = ENGINE_FILE
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=2) + "\n", overwrite=False)
    return d
