#!/usr/bin/env python
"""Fuzz the engine's inputs: argument lists, HKL/matrix/SMV/source files and audit documents.

    python scripts/fuzz_inputs.py --seed 1 --seconds 600 [--mem-mib 3072] [--case-timeout 30]

A parent process generates cases from the seed and hands them, one at a time, to a worker
process whose address space is limited with resource.setrlimit.  Each case must end, within
the case timeout, either normally (for an argument list: a finite image) or with one of the
project's own error types.  A hang (timeout), a crash of the worker, an exception of another
type or a non-finite image from finite inputs is a finding.  The figures are printed as JSON
on the last line; the exit status is 1 when there are findings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- case generation
NUMS = ["0", "-0", "1", "-1", "2", "0.5", "1e-300", "1e300", "-1e300", "nan", "inf", "-inf", "1e30", "1e11",
        "2147483648", "9223372036854775808", "-5", "3", "90", "180", "360", "100", "1000", "65537", "1e-9",
        "0x10", "abc", "", "1.5", "12345678", "-2147483649"]
FLAG_SAMPLES = {
    "-cell": 6, "-N": 1, "-Na": 1, "-Nb": 1, "-Nc": 1, "-default_F": 1, "-lambda": 1, "-energy": 1,
    "-distance": 1, "-close_distance": 1, "-pixel": 1, "-detpixels": 1, "-detpixels_f": 1, "-detpixels_s": 1,
    "-detsize": 1, "-oversample": 1, "-twotheta": 1, "-detector_rotx": 1, "-detector_roty": 1,
    "-detector_rotz": 1, "-roi": 4, "-mosaic": 1, "-mosaic_domains": 1, "-phi": 1, "-osc": 1, "-phistep": 1,
    "-phisteps": 1, "-dispersion": 1, "-dispsteps": 1, "-divergence": 1, "-hdivrange": 1, "-vdivrange": 1,
    "-hdivstep": 1, "-vdivstep": 1, "-hdivsteps": 1, "-vdivsteps": 1, "-divsteps": 1, "-polar": 1,
    "-fluence": 1, "-flux": 1, "-exposure": 1, "-beamsize": 1, "-water": 1, "-samplesize": 1,
    "-xtal_thick": 1, "-detector_thick": 1, "-detector_thicksteps": 1, "-detector_abs": 1, "-dmin": 1,
    "-Xbeam": 1, "-Ybeam": 1, "-Xclose": 1, "-Yclose": 1, "-ORGX": 1, "-ORGY": 1, "-fudge": 1, "-seed": 1,
    "-mosaic_seed": 1, "-misset": 3, "-beam_vector": 3, "-polar_vector": 3, "-spindle_axis": 3,
    "-fdet_vector": 3, "-sdet_vector": 3, "-odet_vector": 3, "-twotheta_axis": 3, "-scale": 1, "-adc": 1,
}
SWITCHES = ["-round_xtal", "-gauss_xtal", "-tophat_spots", "-square_xtal", "-interpolate", "-nointerpolate",
            "-point_pixel", "-curved_det", "-oversample_thick", "-oversample_polar", "-oversample_omega",
            "-fix_phi0", "-fix_oversample", "-nopolar", "-square_div", "-round_div", "-xds", "-dials",
            "-adxv", "-denzo", "-mosflm"]
BASE = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-detpixels", "24"]


def gen_args(rng: random.Random):
    args = list(BASE) if rng.random() < 0.8 else []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.75:
            flag = rng.choice(list(FLAG_SAMPLES))
            vals = [rng.choice(NUMS) if rng.random() < 0.7 else repr(rng.uniform(-400, 400))
                    for _ in range(FLAG_SAMPLES[flag])]
            if rng.random() < 0.05:
                vals = vals[:-1]  # a missing value
            args += [flag] + vals
        elif r < 0.95:
            args.append(rng.choice(SWITCHES))
        else:
            args.append(rng.choice(["-bogus", "--", "-", "-cel", "-hkl"]))
    return args


def gen_text(rng: random.Random, kind: str) -> str:
    tokens = NUMS + ["#", "_", "é", "\t", "1 2 3", "\r", "nan", "0", "1"]
    lines = []
    for _ in range(rng.randint(0, 12)):
        if kind == "hkl" and rng.random() < 0.6:
            lines.append(" ".join(str(rng.randint(-6, 6)) for _ in range(3)) + f" {rng.choice(NUMS)}")
        elif kind == "mat" and rng.random() < 0.6:
            lines.append(" ".join(rng.choice(NUMS[:12]) for _ in range(3)))
        elif kind == "source" and rng.random() < 0.6:
            lines.append(" ".join(rng.choice(NUMS[:14]) for _ in range(rng.randint(1, 6))))
        else:
            lines.append(" ".join(rng.choice(tokens) for _ in range(rng.randint(0, 6))))
    return "\n".join(lines) + ("\n" if rng.random() < 0.7 else "")


def gen_smv(rng: random.Random) -> str:
    keys = ["HEADER_BYTES", "SIZE1", "SIZE2", "TYPE", "BYTE_ORDER", "DIM", "PIXEL_SIZE", "DISTANCE", "WAVELENGTH"]
    vals = {"HEADER_BYTES": rng.choice(["512", "0", "-1", "1e9", "abc", "512"]),
            "SIZE1": rng.choice(["4", "0", "-3", "1e6", "nan", "4"]), "SIZE2": rng.choice(["4", "0", "2", "4"]),
            "TYPE": rng.choice(["unsigned_short", "float", "weird", "unsigned_short"]),
            "BYTE_ORDER": rng.choice(["little_endian", "big_endian", "middle"]), "DIM": "2",
            "PIXEL_SIZE": rng.choice(NUMS), "DISTANCE": rng.choice(NUMS), "WAVELENGTH": rng.choice(NUMS)}
    head = "{\n" + "".join(f"{k}={vals[k]};\n" for k in keys if rng.random() < 0.9) + "}\n"
    head = head.ljust(512)[:512] if rng.random() < 0.8 else head
    return head + "\x00" * rng.choice([0, 16, 32, 100])


def gen_case(rng: random.Random):
    r = rng.random()
    if r < 0.55:
        return {"kind": "args", "args": gen_args(rng)}
    if r < 0.7:
        return {"kind": "hkl", "text": gen_text(rng, "hkl")}
    if r < 0.78:
        return {"kind": "mat", "text": gen_text(rng, "mat")}
    if r < 0.86:
        return {"kind": "source", "text": gen_text(rng, "source")}
    if r < 0.93:
        return {"kind": "smv", "text": gen_smv(rng)}
    return {"kind": "audit", "mutation": rng.randint(0, 10_000)}


# ---------------------------------------------------------------- the worker
def _project_error(exc: BaseException) -> bool:
    """The project's own error types (each shown as one line by the commands)."""
    return type(exc).__module__.startswith("torchbragg") or type(exc) in (FileNotFoundError, IsADirectoryError)


def _audit_case(seed: int, folder: str):
    from torchbragg.tap_audit import write_audit

    rng = random.Random(seed)
    bundle = os.path.join(folder, "bundle")
    os.makedirs(os.path.join(bundle, "py_taps"), exist_ok=True)
    os.makedirs(os.path.join(bundle, "comparison"), exist_ok=True)
    row = {"thick": 0, "subpixel_index": [0, 0], "source": 0, "phi": 0, "mosaic": 0, "hkl_fractional": [0.1, 0.2, 0.3],
           "hkl_rounded": [0, 0, 0], "F_cell": 100.0, "F_latt": 1.0, "out_of_bounds": False, "lookup": "default_F",
           "skipped": False}
    doc = {"tap_id": "hkl_subpixel", "pixel_coords": [1, 1], "oversample": 1, "final_intensity": 1.0,
           "dtype": "float64",
           "device": "cpu", "config": {"args": ["-N", "1"], "hkl_source": {"kind": "none", "describe": "none"},
                                       "hkl_bounds": None, "default_F": 100.0}, "values": {"subpixels": [row]}}
    c = {"configs": {"x": {"args": ["-N", "1"], "pixels": [{"pixel_slow_fast": [1, 1], "pixel_value": 1.0, "rows": [
        {"thick": 0, "subS": 0, "subF": 0, "source": 0, "phi": 0, "mos": 0, "h": 0.1, "k": 0.2, "l": 0.3, "h0": 0,
         "k0": 0, "l0": 0, "F_cell": 100.0, "F_latt": 1.0, "oob": 0}]}]}}}
    weird = [None, "x", [], {}, float("nan"), float("inf"), -1, 1e308, [1], {"a": 1}, True]

    def mutate(node, depth=0):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if rng.random() < 0.3 or depth > 4:
                if rng.random() < 0.3:
                    del node[key]
                else:
                    node[key] = copy.deepcopy(rng.choice(weird))
            else:
                mutate(node[key], depth + 1)
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.4 or depth > 4:
                node[i] = copy.deepcopy(rng.choice(weird))
            else:
                mutate(node[i], depth + 1)

    for _ in range(rng.randint(1, 3)):
        mutate(doc if rng.random() < 0.5 else c)
    with open(os.path.join(bundle, "py_taps", "tap.json"), "w") as fh:
        json.dump(doc, fh)
    with open(os.path.join(folder, "c.json"), "w") as fh:
        json.dump(c, fh)
    path = write_audit(bundle, os.path.join(folder, "c.json"))
    text = open(path).read()
    bad = any(isinstance(v, float) and v != v or v in (float("inf"), float("-inf"))
              for v in _numbers(doc) + _numbers(c))
    if bad and "No mismatch" in text:
        raise AssertionError("the audit passed a document with a non-finite number")


def _magnitude(text: str) -> float:
    try:
        return abs(float(text))
    except ValueError:
        return 0.0


def _numbers(node):
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [node]
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    return []


def run_case(case: dict) -> dict:

    import torch

    from torchbragg import Simulation

    with tempfile.TemporaryDirectory() as folder:
        try:
            if case["kind"] == "args":
                sim = Simulation.from_args(case["args"], cwd=folder, dtype=torch.float64)
                if sim.setup.fpixels * sim.setup.spixels * sim.setup.steps * sim.setup.thicksteps > 5e6:
                    return {"result": "ok-not-rendered"}
                img = sim.render()
                finite_inputs = all(not any(t in a.lower() for t in ("nan", "inf")) for a in case["args"])
                if finite_inputs and not bool(torch.isfinite(img).all()):
                    # float64 overflow needs magnitudes near 1e300: record, not a finding, when one is given
                    huge = any(_magnitude(a) > 1e100 for a in case["args"])
                    return {"result": "nonfinite-huge" if huge else "nonfinite",
                            "detail": "non-finite image from finite inputs"}
                return {"result": "ok"}
            if case["kind"] == "audit":
                _audit_case(case["mutation"], folder)
                return {"result": "ok"}
            path = os.path.join(folder, "input")
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(case["text"])
            if case["kind"] == "hkl":
                from torchbragg.io.hkl_table import read_hkl

                read_hkl(path, 0.0)
            elif case["kind"] == "mat":
                from torchbragg.io.matrix_file import read_mosflm_matrix

                read_mosflm_matrix(path)
            elif case["kind"] == "smv":
                from torchbragg.io.smv import read_smv

                read_smv(path)
            elif case["kind"] == "source":
                Simulation.from_args(BASE + ["-sourcefile", path], cwd=folder)
            return {"result": "ok"}
        except MemoryError:
            return {"result": "memory", "detail": traceback.format_exc(limit=-3)}
        except Exception as exc:  # noqa: BLE001 - classifying is the point
            if _project_error(exc) and "\n" not in str(exc).strip() and str(exc).strip():
                return {"result": "error", "type": type(exc).__name__}
            return {"result": "unexpected", "type": type(exc).__name__, "message": str(exc)[:300],
                    "detail": traceback.format_exc(limit=-4)}


def worker(mem_mib: int) -> None:
    import resource

    limit = mem_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch  # noqa: F401  (imported once, before the cases)

    torch.set_num_threads(1)
    import torchbragg  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        out = run_case(json.loads(line))
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- the parent
class Worker:
    def __init__(self, mem_mib: int):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--mem-mib", str(mem_mib)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        if self._read(300) != "ready":
            raise RuntimeError("fuzz worker did not start")

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else ""

    def run(self, case, timeout):
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"result": "crash"}
        line = self._read(timeout)
        if line is None:
            return {"result": "hang"}
        if not line:
            return {"result": "crash", "detail": f"worker exited {self.proc.poll()}"}
        return json.loads(line)

    def close(self):
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()


def fuzz(seed: int, seconds: float, max_cases: int, mem_mib: int, case_timeout: float) -> dict:
    rng = random.Random(seed)
    start = time.monotonic()
    counts: dict = {}
    findings = []
    w = Worker(mem_mib)
    n = 0
    slowest, slowest_case = 0.0, None
    try:
        while n < max_cases and time.monotonic() - start < seconds:
            case = gen_case(rng)
            t0 = time.monotonic()
            res = w.run(case, case_timeout)
            took = time.monotonic() - t0
            if took > slowest:
                slowest, slowest_case = took, case
            n += 1
            key = res["result"] if res["result"] != "error" else f"error:{res['type']}"
            counts[key] = counts.get(key, 0) + 1
            if res["result"] in ("hang", "crash", "unexpected", "nonfinite", "memory"):
                findings.append({"case": case, **res})
                w.close()
                w = Worker(mem_mib)
    finally:
        w.close()
    return {"seed": seed, "cases": n, "seconds": round(time.monotonic() - start, 1),
            "slowest_case_s": round(slowest, 2), "slowest_case": slowest_case,
            "counts": dict(sorted(counts.items())), "findings": findings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-cases", type=int, default=10 ** 9)
    p.add_argument("--mem-mib", type=int, default=3072)
    p.add_argument("--case-timeout", type=float, default=30.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        worker(ns.mem_mib)
        return 0
    report = fuzz(ns.seed, ns.seconds, ns.max_cases, ns.mem_mib, ns.case_timeout)
    for f in report["findings"][:20]:
        print(json.dumps(f)[:2000], file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "findings"} | {"findings": len(report["findings"])}))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
