"""``torchbragg bench``: speed and memory figures of the engine.

For each named configuration and dtype it measures, each in a fresh Python
process so that nothing is already loaded or compiled:

``first_ever``
    the whole ``torchbragg <args>`` command with an empty kernel cache (so it
    includes compiling the fused kernel) — what a user sees the very first time;
``cli_cold``
    the same command again with the cache filled by the previous run;
``render``
    inside one fresh process: start-up and import time, set-up, the first render (cold: it
    loads the compiled kernel), then ``--repeats`` warm renders (min and
    median), nanoseconds per subpixel evaluation (wall and CPU), and one tap's
    latency (``sim.tap(2048, 2048)``, or the centre pixel of smaller images;
    before :mod:`torchbragg.taps` existed, an eager ``sim.evaluate(...,
    detail=True)`` of that pixel, named in ``tap_method``); for an
    interpolating set-up, the time C's interpolation switch-off scan takes
    before the first render (``cutoff_scan_s``);
``fallback``
    in the same process, after those: warm ``render_with_fallback()`` calls
    (the default_F fallback map, at least 5) interleaved with plain warm
    renders, ``fallback_over_render``, the ratio of their minima, and
    ``fallback_over_render_pairs_median``, the median of the back-to-back
    pairs' ratios (the issue allows 1.10);
``pytorch_path``
    in another fresh process, the same render with the compiled kernels off
    (what a machine without a C++ compiler gets): seconds per render, ns per
    evaluation and ``over_compiled``, its ratio to the compiled warm render
    (``--no-pytorch-path`` skips it; at 4096² it takes half a minute);

and the peak resident memory of every process (``wait4`` on the child). With
``--c-binary PATH`` the C program runs on the same arguments in the same
run, once with ``OMP_NUM_THREADS=1`` and once with all threads, and the
ratios ``torchbragg / C`` are reported; without a binary, ``--c-seconds X``
(the C program's single-thread time measured elsewhere) gives the same ratios
against that figure. ``bragg-tap --pixel 2048 2048`` is timed as a whole
process where that console script exists (skipped otherwise).

Examples
--------
``torchbragg bench --configs tap512 --repeats 2``
``torchbragg bench --configs tap4096,defaultF4096,interp4096 --out reports/benchmarks``
``torchbragg bench --configs tap4096 --dtype float32 --c-binary ~/bin/nanoBragg``

``--out DIR`` writes ``DIR/<UTC stamp>/bench.json`` (never overwriting);
``--json`` prints the JSON document instead of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ..config import TAP_CONFIG_ARGS

__all__ = ["CONFIGS", "main", "run_bench", "SCHEMA", "prepare_files", "write_wide_table"]

SCHEMA = "torchbragg-bench/1"



def _tap(pixels: int) -> list[str]:
    """The tap configuration (:data:`torchbragg.TAP_CONFIG_ARGS`) at ``pixels``² pixels."""
    args = list(TAP_CONFIG_ARGS)
    at = args.index("-detpixels")
    args[at + 1] = str(pixels)
    return args

_DEFAULT_F = ["-default_F", "100", "-cell", "100", "100", "100", "90", "90", "90", "-lambda", "6.2",
              "-distance", "100"]

#: a small crystal (N = 2: C interpolates automatically) with a table wide enough that no lookup's
#: 4x4x4 neighbourhood leaves it, so interpolation never switches off; ``interp_wide<n>.hkl`` is
#: written into the run's folder (h, k, l in -n..n) by :func:`prepare_files`
_INTERP = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "50", "-N", "2", "-lambda", "0.5",
           "-distance", "500", "-pixel", "0.05"]

#: named configurations: nanoBragg arguments
CONFIGS: dict[str, list[str]] = {
    "tap4096": _tap(4096),
    "defaultF4096": _DEFAULT_F + ["-detpixels", "4096"],
    # |h| <= 56.2 at the corners of 4096 x 0.05 mm at 500 mm, 0.5 Å: -60..60 keeps every neighbourhood
    "interp4096": _INTERP + ["-hkl", "interp_wide60.hkl", "-detpixels", "4096"],
    # the tap configuration with the other crystal shapes and with C's oversampled solid angle
    "round4096": _tap(4096) + ["-round_xtal"],
    "gauss4096": _tap(4096) + ["-gauss_xtal"],
    "omega4096": _tap(4096) + ["-oversample_omega", "-fix_oversample"],
    "tap1024": _tap(1024),
    "tap512": _tap(512),
    "defaultF512": _DEFAULT_F + ["-detpixels", "512"],
    "tap128": _tap(128),
    "interp128": _INTERP + ["-hkl", "interp_wide6.hkl", "-detpixels", "128"],
}

_WIDE_TABLE = re.compile(r"^interp_wide(\d+)\.hkl$")


def write_wide_table(path, n: int) -> Path:
    """A smooth structure-factor table with every h, k, l in -n..n (about 1.2 s for n = 60).

    Each line is ``h k l F`` with ``F = 100 + h/2 - k/4 + l/8``, written one h plane at a time.

    Parameters
    ----------
    path : str or os.PathLike
        The text file to write (created or overwritten).
    n : int
        The largest absolute Miller index: h, k and l each run over -n..n.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.
    """
    import numpy as np

    r = np.arange(-n, n + 1)
    k, l = (x.ravel() for x in np.meshgrid(r, r, indexing="ij"))
    path = Path(path)
    # one h plane at a time: the bench process stays small, and Linux counts a parent's resident
    # memory at fork into each child's peak (the figures the bench reports)
    with open(path, "w") as fh:
        for h in r.tolist():
            F = 100.0 + 0.5 * h - 0.25 * k + 0.125 * l
            rows = zip(k.tolist(), l.tolist(), F.tolist(), strict=True)
            fh.write("".join(f"{h} {b} {c} {f:g}\n" for b, c, f in rows))
    return path


def prepare_files(args: Sequence[str], folder) -> list[Path]:
    """Write the generated input files a configuration names (``interp_wide<n>.hkl``) into ``folder``.

    Parameters
    ----------
    args : Sequence[str]
        The configuration's nanoBragg arguments; every one that matches ``interp_wide<n>.hkl`` names a table
        written by :func:`write_wide_table` with that ``n``.
    folder : str or os.PathLike
        The folder the tables are written into (the run's working folder); a table already there is kept.

    Returns
    -------
    list[pathlib.Path]
        The files written by this call (empty when none were needed).
    """
    made = []
    for a in args:
        m = _WIDE_TABLE.match(str(a))
        if m and not (Path(folder) / a).exists():
            made.append(write_wide_table(Path(folder) / a, int(m.group(1))))
    return made

#: what the issue quotes for this machine kind (C program, single thread; a compiled PyTorch port)
REFERENCE_FIGURES = {
    "tap4096": {"c_single_thread_s": [4.7, 6.2], "c_peak_rss_gib": 0.1, "compiled_port_warm_s": 4.7,
                "compiled_port_cold_cli_s": 19.0, "compiled_port_peak_rss_gib": 7.5},
}

_MARK = "TORCHBRAGG_BENCH_RESULT "


# --------------------------------------------------------------------- child
def _child(spec_json: str) -> int:
    """Body of the fresh measuring process; prints one JSON line."""
    spec = json.loads(spec_json)
    import resource

    import torch

    import torchbragg
    from torchbragg.kernels.build import kernel_cache_dir

    # interpreter start-up and imports (torch, numpy, torchbragg), from the parent's spawn time
    startup = time.time() - spec["spawn_time"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    dtype = torch.float64 if spec["dtype"] == "float64" else torch.float32

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {"dtype": spec["dtype"], "device": device, "threads": torch.get_num_threads(), "startup_import_s": startup}
    t0 = time.perf_counter()
    sim = torchbragg.Simulation.from_args(spec["args"], device=device, dtype=dtype)
    out["setup_s"] = time.perf_counter() - t0
    plan = sim.compiled_plan() if hasattr(sim, "compiled_plan") else None
    if getattr(sim.setup, "interpolate", False):  # C's switch-off scan (part of the first render otherwise)
        t0 = time.perf_counter()
        out["cutoff"] = sim.interpolation_cutoff()
        out["cutoff_scan_s"] = time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    image = sim.render()
    sync()
    out["first_render_s"] = time.perf_counter() - t0
    out["first_render_cpu_s"] = time.process_time() - c0
    out["fast_kernel"] = bool(plan is not None and plan.function(False) is not None)
    out["kernel"] = type(plan).__name__ if out["fast_kernel"] else "eager"
    out["last_kernel"] = getattr(sim, "last_kernel", None)  # e.g. "fused CPU kernel + eager rows"
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
        out["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20
    warm, warm_cpu = [], []
    for _ in range(max(1, int(spec["repeats"]))):
        c0, t0 = time.process_time(), time.perf_counter()
        image = sim.render()
        sync()
        warm.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
    out["warm_s"] = warm
    out["warm_min_s"] = min(warm)
    out["warm_median_s"] = statistics.median(warm)
    out["warm_cpu_min_s"] = min(warm_cpu)
    ny, nx = sim.shape
    evals = ny * nx * sim.evaluations_per_pixel
    out["evaluations"] = evals
    out["ns_per_eval"] = 1e9 * min(warm) / evals
    out["cpu_ns_per_eval"] = 1e9 * min(warm_cpu) / evals
    out["image_sum"] = float(image.sum(dtype=torch.float64))  # no float64 copy: keeps the RSS figure honest
    out["image_max"] = float(image.max())

    # one tap's latency, after the Simulation exists
    slow, fast = (2048, 2048) if (ny > 2048 and nx > 2048) else (ny // 2, nx // 2)
    out["tap_pixel"] = [slow, fast]

    def one_tap():
        try:
            sim.tap(slow, fast)
            return "sim.tap"
        except (ImportError, AttributeError, NotImplementedError):
            rows = torch.tensor([slow], device=sim.device)
            cols = torch.tensor([fast], device=sim.device)
            sim.evaluate(rows, cols, detail=True)
            return "sim.evaluate(detail=True)"

    t0 = time.perf_counter()
    try:
        out["tap_method"] = one_tap()
        sync()
        out["tap_first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        one_tap()
        sync()
        out["tap_s"] = time.perf_counter() - t0
    except Exception as err:  # a tap failing must not lose the render figures
        out["tap_error"] = f"{type(err).__name__}: {err}"
    out["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    del image
    if hasattr(sim, "render_with_fallback"):
        # the fallback map's cost: warm render_with_fallback() against plain warm renders interleaved
        # with it (the same load on both), ratio of the minima
        fmap = sim.render_with_fallback()  # the count variant's first use (a compile, the first time)
        del fmap
        fb, plain = [], []
        for _ in range(max(5, int(spec["repeats"]))):
            t0 = time.perf_counter()
            image = sim.render()
            sync()
            plain.append(time.perf_counter() - t0)
            del image
            t0 = time.perf_counter()
            fmap = sim.render_with_fallback()
            sync()
            fb.append(time.perf_counter() - t0)
            del fmap
        out["fallback_warm_s"] = fb
        out["fallback_render_warm_s"] = plain
        out["fallback_warm_min_s"] = min(fb)
        out["fallback_over_render"] = min(fb) / min(plain)
        # each pair ran back to back under the same load: the median of their ratios is the steadier figure
        out["fallback_over_render_pairs_median"] = statistics.median(b / a for a, b in zip(plain, fb, strict=True))
        out["peak_rss_with_fallback_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["kernel_cache_dir"] = str(kernel_cache_dir())
    print(_MARK + json.dumps(out), flush=True)
    return 0


def _pytorch_path_child(spec_json: str) -> int:
    """Body of the process timing the PyTorch path (no compiled kernel); prints one JSON line.

    One render, repeated up to ``repeats`` times while each takes under two seconds (a slow
    render's own warm-up is small beside it); the minimum is reported.
    """
    spec = json.loads(spec_json)
    import torch

    import torchbragg

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    dtype = torch.float64 if spec["dtype"] == "float64" else torch.float32
    sim = torchbragg.Simulation.from_args(spec["args"], device=device, dtype=dtype)
    sim.use_compiled_kernels = False
    times = []
    while True:
        t0 = time.perf_counter()
        sim.render()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if times[-1] >= 2.0 or len(times) >= max(1, int(spec["repeats"])):
            break
    ny, nx = sim.shape
    evals = ny * nx * sim.evaluations_per_pixel
    out = {"render_s": times, "render_min_s": min(times), "ns_per_eval": 1e9 * min(times) / evals,
           "last_kernel": sim.last_kernel}
    print(_MARK + json.dumps(out), flush=True)
    return 0


#: the parameter families of the gradient measurement: 10 components
GRADIENT_PARAMS = ("distance", "beam_center", "misset", "detector_rotation", "wavelength")


def _gradient_child(spec_json: str) -> int:
    """Body of the process timing forward + backward of a sum-of-squares loss; prints one JSON line.

    The loss is ``sum(image²)`` differentiated with respect to :data:`GRADIENT_PARAMS` (10
    components); the first pass includes the warm-up, the minimum over ``repeats`` passes is reported.
    """
    spec = json.loads(spec_json)
    import torch

    import torchbragg

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dtype = torch.float64 if spec["dtype"] == "float64" else torch.float32
    sim = torchbragg.Simulation.from_args(spec["args"], device=spec["device"], dtype=dtype,
                                          requires_grad=list(GRADIENT_PARAMS))
    forward, backward = [], []
    for _ in range(max(2, int(spec["repeats"]))):
        for leaf in sim.parameters().values():
            leaf.grad = None
        t0 = time.perf_counter()
        image = sim.render()
        t1 = time.perf_counter()
        (image.to(torch.float64) ** 2).sum().backward()
        t2 = time.perf_counter()
        forward.append(t1 - t0)
        backward.append(t2 - t1)
    total = [f + b for f, b in zip(forward, backward, strict=True)]
    components = sum(int(p.numel()) for p in sim.parameters().values())
    out = {"forward_s": forward, "backward_s": backward, "warm_min_s": min(total[1:]), "first_s": total[0],
           "parameters": list(GRADIENT_PARAMS), "components": components,
           "backward_kernel": sim.gradients.last_backward}
    print(_MARK + json.dumps(out), flush=True)
    return 0


# -------------------------------------------------------------------- parent
def _run_process(cmd: Sequence[str], env: dict | None = None, cwd: str | None = None,
                 timeout: float = 3600.0) -> dict:
    """Run a command; wall time, exit status, peak RSS and CPU times of that process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return {"wall_s": wall, "returncode": proc.returncode, "peak_rss_mib": usage.ru_maxrss / 1024.0,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "stdout": stdout, "stderr": stderr}


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def _cli_command(args: Sequence[str], dtype: str, device: str) -> list[str]:
    return [sys.executable, "-m", "torchbragg", *args, "-dtype", dtype, "-device", device]


def _summary(proc: dict) -> dict:
    keep = {k: proc[k] for k in ("wall_s", "returncode", "peak_rss_mib", "user_s", "sys_s")}
    if proc["returncode"] != 0:
        keep["error"] = (proc["stderr"] or proc["stdout"]).strip()[-1000:]
    return keep


def _measure_config(name: str, args: list[str], dtype: str, opts) -> dict:
    res: dict = {}
    base_env = {"TORCHBRAGG_FAST": "0" if opts.eager else None}
    if opts.threads:
        base_env.update(OMP_NUM_THREADS=opts.threads, MKL_NUM_THREADS=opts.threads)
    with tempfile.TemporaryDirectory(prefix="torchbragg-bench-") as work:
        prepare_files(args, work)  # generated inputs (wide HKL tables), named relative to the run's folder
        cli = _cli_command(args, dtype, opts.device)
        if opts.write_image:
            cli += ["-floatfile", os.path.join(work, "float.bin")]
        if not opts.no_first_ever:
            empty = os.path.join(work, "kernel-cache")
            first = _run_process(cli, env=_env(TORCHBRAGG_CACHE_DIR=empty, **base_env), cwd=work)
            res["first_ever"] = _summary(first)
        _run_process(cli, env=_env(**base_env), cwd=work)  # fills the user's kernel cache if it is empty
        cold = _run_process(cli, env=_env(**base_env), cwd=work)
        res["cli_cold"] = _summary(cold)
        spec = {"args": args, "dtype": dtype, "device": opts.device, "repeats": opts.repeats,
                "threads": opts.threads, "spawn_time": time.time()}
        child = _run_process([sys.executable, "-c",
                              "import sys; from torchbragg.cli.bench import _child; sys.exit(_child(sys.argv[1]))",
                              json.dumps(spec)], env=_env(**base_env), cwd=work)
        render = {"process": _summary(child)}
        for line in child["stdout"].splitlines():
            if line.startswith(_MARK):
                render.update(json.loads(line[len(_MARK):]))
        res["render"] = render
        if not opts.eager and not opts.no_pytorch_path:
            # the speed a machine without a C++ compiler gets, measured in the same run
            child = _run_process([sys.executable, "-c",
                                  "import sys; from torchbragg.cli.bench import _pytorch_path_child; "
                                  "sys.exit(_pytorch_path_child(sys.argv[1]))", json.dumps(spec)],
                                 env=_env(**base_env), cwd=work)
            path = {"process": _summary(child)}
            for line in child["stdout"].splitlines():
                if line.startswith(_MARK):
                    path.update(json.loads(line[len(_MARK):]))
            if path.get("render_min_s") and render.get("warm_min_s"):
                path["over_compiled"] = path["render_min_s"] / render["warm_min_s"]
            res["pytorch_path"] = path
        if getattr(opts, "gradient", False):
            child = _run_process([sys.executable, "-c",
                                  "import sys; from torchbragg.cli.bench import _gradient_child; "
                                  "sys.exit(_gradient_child(sys.argv[1]))", json.dumps(spec)],
                                 env=_env(**base_env), cwd=work)
            grad = {"process": _summary(child)}
            for line in child["stdout"].splitlines():
                if line.startswith(_MARK):
                    grad.update(json.loads(line[len(_MARK):]))
            res["gradient"] = grad
    return res


def _tap_process(opts) -> dict | None:
    exe = shutil.which("bragg-tap")
    if exe is None:
        cand = Path(sys.executable).with_name("bragg-tap")
        exe = str(cand) if cand.exists() else None
    if exe is None:
        return {"skipped": "bragg-tap console script not installed"}
    proc = _run_process([exe, "--pixel", "2048", "2048"], env=_env())
    out = _summary(proc)
    if proc["returncode"] != 0:
        out["skipped"] = "bragg-tap failed (see error)"
    return out


def _c_runs(args: list[str], binary: str) -> dict:
    out = {"binary": os.path.abspath(binary)}
    for label, threads in (("single_thread", 1), ("all_threads", os.cpu_count() or 1)):
        with tempfile.TemporaryDirectory(prefix="nanoBragg-bench-") as work:
            proc = _run_process([out["binary"], *args], env=_env(OMP_NUM_THREADS=threads), cwd=work)
        entry = _summary(proc)
        entry["threads"] = threads
        out[label] = entry
    return out


def _host() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "load_average": list(os.getloadavg()),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else []}


def run_bench(opts) -> dict:
    """Measure every requested configuration; returns the JSON document.

    Parameters
    ----------
    opts : argparse.Namespace
        The options parsed by :func:`build_parser`, plus ``argv`` (the arguments as given, recorded in the
        document's ``command``). ``opts.configs`` is a comma-separated list of :data:`CONFIGS` names.

    Returns
    -------
    dict
        The report (schema :data:`SCHEMA`): creation time, host, options and, under ``configs``, one entry
        per configuration with its runs per dtype and, where a C time is known, the ratios against it.

    Raises
    ------
    ValueError
        If a configuration name is not in :data:`CONFIGS`.
    """
    from .. import __version__

    names = [n.strip() for n in opts.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    dtypes = ["float32", "float64"] if opts.dtype == "both" else [opts.dtype]
    doc = {"schema": SCHEMA, "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "torchbragg": __version__, "command": ["torchbragg", "bench", *opts.argv], "host": _host(),
           "options": {"device": opts.device, "dtypes": dtypes, "repeats": opts.repeats, "threads": opts.threads,
                       "eager": opts.eager, "pytorch_path": not (opts.eager or opts.no_pytorch_path),
                       "write_image": opts.write_image},
           "configs": {}}
    for name in names:
        args = CONFIGS[name]
        entry: dict = {"args": args, "runs": {}}
        for dtype in dtypes:
            _log(opts, f"{name} {dtype} ...")
            entry["runs"][dtype] = _measure_config(name, args, dtype, opts)
        r = entry["runs"]
        if "float32" in r and "float64" in r:
            w32 = r["float32"]["render"].get("warm_min_s")
            w64 = r["float64"]["render"].get("warm_min_s")
            if w32 and w64:
                entry["float64_over_float32"] = w64 / w32
        if name in REFERENCE_FIGURES:
            entry["reference"] = REFERENCE_FIGURES[name]
        c_seconds = None
        if opts.c_binary:
            _log(opts, f"{name} C program ...")
            entry["c"] = _c_runs(args, opts.c_binary)
            if entry["c"]["single_thread"]["returncode"] == 0:
                c_seconds = entry["c"]["single_thread"]["wall_s"]
        elif opts.c_seconds:
            entry["c"] = {"single_thread": {"wall_s": opts.c_seconds, "source": "--c-seconds"}}
            c_seconds = opts.c_seconds
        if c_seconds:
            ratios = {}
            for dtype, run in r.items():
                warm = run["render"].get("warm_min_s")
                if warm:
                    ratios[f"{dtype}_warm_over_c"] = warm / c_seconds
                ratios[f"{dtype}_cli_cold_over_c"] = run["cli_cold"]["wall_s"] / c_seconds
            if opts.c_binary and entry["c"]["all_threads"]["returncode"] == 0:
                c_all = entry["c"]["all_threads"]["wall_s"]
                for dtype, run in r.items():
                    if run["render"].get("warm_min_s"):
                        ratios[f"{dtype}_warm_over_c_all_threads"] = run["render"]["warm_min_s"] / c_all
            entry["ratios"] = ratios
        doc["configs"][name] = entry
    if "tap4096" in names and not opts.no_tap_process:
        doc["bragg_tap_process"] = _tap_process(opts)
    import resource

    # Linux counts the spawning process's resident memory into each child's peak (at exec): no
    # child's peak_rss_mib below reads lower than this
    doc["bench_process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return doc


def _log(opts, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def _fmt(x, unit="s", digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit == "s" and 0 < x < 0.01:  # GPU renders: milliseconds
        return f"{1e3 * x:.{max(1, digits - 1)}f}ms"
    return f"{x:.{digits}f}{unit}"


def format_table(doc: dict) -> str:
    """The human-readable summary printed by ``torchbragg bench``.

    Parameters
    ----------
    doc : dict
        A report as returned by :func:`run_bench`.

    Returns
    -------
    str
        The table, one configuration and dtype a line followed by indented notes, lines joined by newlines.
    """
    h = doc["host"]
    load = h.get("load_average")
    lines = [f"torchbragg {doc['torchbragg']} bench — {h['cpu']}, {h['cpu_count']} CPUs, torch {h['torch']} "
             f"({h['torch_threads']} threads), device {doc['options']['device']}"
             + (f" ({', '.join(h['gpus'])})" if h.get("gpus") and doc["options"]["device"].startswith("cuda") else "")
             + (f", load average {load[0]:.1f} at start" if load else "")]
    head = (f"{'config':<14}{'dtype':<9}{'evals':>11}{'first-ever':>12}{'cli cold':>10}{'(cpu)':>8}{'1st render':>11}"
            f"{'warm':>9}{'ns/eval':>9}{'cpu ns/ev':>10}{'tap':>9}{'peak RSS':>10}")
    lines.append(head)
    for name, entry in doc["configs"].items():
        for dtype, run in entry["runs"].items():
            rr = run["render"]
            rss = max(run["cli_cold"].get("peak_rss_mib", 0), rr.get("process", {}).get("peak_rss_mib", 0))
            fe = run.get("first_ever", {}).get("wall_s")
            cc = run["cli_cold"]
            cli_cpu = cc.get("user_s", 0.0) + cc.get("sys_s", 0.0) if "user_s" in cc else None
            lines.append(
                f"{name:<14}{dtype:<9}{rr.get('evaluations', 0):>11,}{_fmt(fe):>12}{_fmt(cc['wall_s']):>10}"
                f"{_fmt(cli_cpu, 's', 2):>8}"
                f"{_fmt(rr.get('first_render_s')):>11}{_fmt(rr.get('warm_min_s')):>9}"
                f"{_fmt(rr.get('ns_per_eval'), '', 2):>9}{_fmt(rr.get('cpu_ns_per_eval'), '', 2):>10}"
                f"{_fmt(rr.get('tap_s')):>9}{rss:>8.0f}Mi")
            for key in ("first_ever", "cli_cold"):
                if run.get(key, {}).get("error"):
                    lines.append(f"    {key} failed: {run[key]['error'].splitlines()[-1]}")
            if rr.get("process", {}).get("error"):
                lines.append(f"    render process failed: {rr['process']['error'].splitlines()[-1]}")
            if not rr.get("fast_kernel", True):
                lines.append("    (PyTorch path: the compiled kernel is off or unavailable)")
            pp = run.get("pytorch_path")
            if pp:
                if pp.get("process", {}).get("error"):
                    lines.append(f"    PyTorch path failed: {pp['process']['error'].splitlines()[-1]}")
                elif pp.get("render_min_s"):
                    ratio = pp.get("over_compiled")
                    lines.append(f"    PyTorch path (no compiled kernel): {_fmt(pp['render_min_s'])} per render, "
                                 f"{pp['ns_per_eval']:.1f} ns/eval, peak RSS {pp['process']['peak_rss_mib']:.0f}Mi"
                                 + (f"; {ratio:.1f}x the compiled kernel's warm render" if ratio else ""))
            gr = run.get("gradient")
            if gr:
                if gr.get("process", {}).get("error"):
                    lines.append(f"    gradient failed: {gr['process']['error'].splitlines()[-1]}")
                elif gr.get("warm_min_s"):
                    lines.append(f"    forward + backward of sum(image^2), {gr['components']} parameters: "
                                 f"{_fmt(gr['warm_min_s'])} warm (forward {_fmt(min(gr['forward_s'][1:]))}, "
                                 f"backward {_fmt(min(gr['backward_s'][1:]))}), first {_fmt(gr['first_s'])}, "
                                 f"peak RSS {gr['process']['peak_rss_mib']:.0f}Mi"
                                 + (f", backward by the {gr['backward_kernel']}" if gr.get("backward_kernel") else ""))
            if rr.get("gpu"):
                lines.append(f"    {rr.get('kernel', '?')} on {rr['gpu']}, peak GPU memory "
                             f"{rr.get('gpu_peak_memory_mib', 0):.0f} MiB")
            if "cutoff_scan_s" in rr:
                cut = rr.get("cutoff")
                lines.append(f"    interpolation switch-off scan: {_fmt(rr['cutoff_scan_s'])}"
                             f" ({'never switches off' if cut is None else f'switches off at evaluation {cut}'})")
            if "fallback_over_render" in rr:
                pairs = rr.get("fallback_over_render_pairs_median")
                lines.append(f"    fallback map: render_with_fallback {_fmt(rr['fallback_warm_min_s'])} vs render "
                             f"{_fmt(min(rr['fallback_render_warm_s']))} warm, "
                             f"{100 * (rr['fallback_over_render'] - 1):+.1f}%"
                             + (f" (median of back-to-back pairs {100 * (pairs - 1):+.1f}%)" if pairs else ""))
        if "float64_over_float32" in entry:
            lines.append(f"    float64 / float32 warm render: {entry['float64_over_float32']:.2f}x")
        c = entry.get("c")
        if c:
            for label in ("single_thread", "all_threads"):
                if label in c:
                    e = c[label]
                    extra = f", peak RSS {e['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in e else ""
                    src = f" ({e['source']})" if "source" in e else ""
                    lines.append(f"    C program {label.replace('_', ' ')}: {_fmt(e['wall_s'])}{extra}{src}")
        for k, v in entry.get("ratios", {}).items():
            lines.append(f"    {k}: {v:.3f}")
    tp = doc.get("bragg_tap_process")
    if tp:
        if "skipped" in tp and "wall_s" not in tp:
            lines.append(f"bragg-tap --pixel 2048 2048: skipped ({tp['skipped']})")
        else:
            lines.append(f"bragg-tap --pixel 2048 2048: {_fmt(tp.get('wall_s'))} whole process, "
                         f"peak RSS {tp.get('peak_rss_mib', 0):.0f} MiB"
                         + (f" — {tp['skipped']}" if "skipped" in tp else ""))
    if doc.get("bench_process_peak_rss_mib"):
        lines.append(f"(peak RSS figures cannot read below the bench process's own, "
                     f"{doc['bench_process_peak_rss_mib']:.0f} MiB: Linux counts it into each child at exec)")
    return "\n".join(lines)


def _write_report(doc: dict, out_dir: str) -> Path:
    from ..io.atomic_io import atomic_write_text

    base = Path(out_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1000):
        folder = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return atomic_write_text(folder / "bench.json", json.dumps(doc, indent=2) + "\n", overwrite=False)
    raise FileExistsError(f"no free report folder under {base}")


def build_parser() -> argparse.ArgumentParser:
    """The ``torchbragg bench`` command line.

    Returns
    -------
    argparse.ArgumentParser
        Its options (``--configs``, ``--device``, ``--dtype``, ``--repeats``, ...), read by :func:`run_bench`.
    """
    p = argparse.ArgumentParser(
        prog="torchbragg bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configurations: " + ", ".join(f"{k} ({' '.join(v)})" for k, v in CONFIGS.items())
        + "\n\nWithout --c-binary, --c-seconds X gives the ratios against a C time you measured yourself "
          "(single thread, same arguments); the issue's reference for tap4096 on a 2-core machine is 4.7-6.2 s.")
    p.add_argument("--configs", default="tap4096,defaultF4096", help="comma-separated names (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="both", choices=["float32", "float64", "both"],
                   help="render dtype(s); 'both' also reports the float64/float32 ratio (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="warm renders per process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the measuring processes")
    p.add_argument("--c-binary", default=None, metavar="PATH", help="the nanoBragg C program to time alongside")
    p.add_argument("--c-seconds", type=float, default=None, metavar="X",
                   help="C program single-thread seconds for the ratios when no binary is at hand")
    p.add_argument("--eager", action="store_true", help="time the eager kernel (TORCHBRAGG_FAST=0)")
    p.add_argument("--no-pytorch-path", action="store_true",
                   help="skip timing the PyTorch path (what a machine without a C++ compiler renders with)")
    p.add_argument("--write-image", action="store_true",
                   help="let the command-line runs write -floatfile (to a temporary folder)")
    p.add_argument("--no-first-ever", action="store_true", help="skip the empty-kernel-cache run")
    p.add_argument("--no-tap-process", action="store_true", help="skip timing the bragg-tap command")
    p.add_argument("--gradient", action="store_true",
                   help="also time forward + backward of sum(image^2) with respect to 10 parameters")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/<UTC stamp>/bench.json")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchbragg bench``; returns the exit code.

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        The arguments after ``bench``; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 when every measuring process succeeded, 1 when a command-line run or a render
        process failed, 2 for a usage error (bad option, ``--repeats`` below 1, ``--c-binary`` not
        executable, unknown configuration); ``--help`` returns 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return int(exc.code or 0)
    opts.argv = argv
    if opts.repeats < 1:
        print("torchbragg bench: --repeats must be at least 1", file=sys.stderr)
        return 2
    if opts.c_binary and not os.access(opts.c_binary, os.X_OK):
        print(f"torchbragg bench: --c-binary {opts.c_binary}: not an executable file", file=sys.stderr)
        return 2
    try:
        doc = run_bench(opts)
    except ValueError as err:
        print(f"torchbragg bench: {err}", file=sys.stderr)
        return 2
    if opts.out:
        path = _write_report(doc, opts.out)
        doc_path = str(path)
    else:
        doc_path = None
    if opts.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(doc))
        if doc_path:
            print(f"wrote {doc_path}")
    failed = any(run[k].get("returncode", 0) != 0 for e in doc["configs"].values() for run in e["runs"].values()
                 for k in ("cli_cold",)) or any(
        run["render"].get("process", {}).get("returncode", 0) != 0 or "warm_min_s" not in run["render"]
        for e in doc["configs"].values() for run in e["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
