#!/usr/bin/env python
"""Interrupt ``torchbragg`` at random moments and check what it leaves behind.

    python scripts/interrupt_trial.py --trials 100 --seed 1

Each trial starts ``python -m torchbragg`` writing three outputs (-floatfile, -intfile,
-pgmfile) into a fresh folder that already holds old versions of them, waits a random time
drawn over the command's whole life (start-up, set-up, render, write), then sends SIGINT or
SIGTERM.  A trial passes when: the exit status is 0 (finished first), 130 (SIGINT) or 143
(SIGTERM); standard error has no traceback and, when interrupted, one line; no temporary
file is left; and the output set is either all old or all new.  Figures are printed as JSON;
exit status 1 when a trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ARGS = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "0.5",
        "-distance", "500", "-pixel", "0.05", "-detpixels", "1024", "-oversample", "3"]
OUTPUTS = {"-floatfile": "img.f32", "-intfile": "img.img", "-pgmfile": "img.pgm"}


def one_trial(rng: random.Random, delay: float, sig: int, env) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        for name in OUTPUTS.values():
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(b"old")
        cmd = [sys.executable, "-m", "torchbragg", *ARGS]
        for flag, name in OUTPUTS.items():
            cmd += [flag, name]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        sent = proc.poll() is None
        if sent:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return {"ok": False, "why": "did not end within 120 s of the signal"}
        life = time.monotonic() - t0
        left = sorted(os.listdir(folder))
        temps = [n for n in left if n.endswith(".tmp") or n.startswith(".")]
        states = {n: ("old" if open(os.path.join(folder, n), "rb").read() == b"old" else "new")
                  for n in OUTPUTS.values() if os.path.exists(os.path.join(folder, n))}
        code = proc.returncode
        expected = {0} | ({130 if sig == signal.SIGINT else 143} if sent else set())
        problems = []
        if code not in expected:
            problems.append(f"exit {code}")
        if "Traceback" in err:
            problems.append("traceback")
        if code in (130, 143) and len(err.strip().splitlines()) != 1:
            problems.append(f"{len(err.strip().splitlines())} lines on standard error")
        if temps:
            problems.append(f"left {temps}")
        if len(states) != len(OUTPUTS) or len(set(states.values())) != 1:
            problems.append(f"partial output set {states}")
        if code in (130, 143) and "no output file was changed" in err and set(states.values()) != {"old"}:
            problems.append("says nothing changed, but outputs are new")
        return {"ok": not problems, "why": "; ".join(problems), "exit": code, "delay": round(delay, 3),
                "life": round(life, 3), "signal": "INT" if sig == signal.SIGINT else "TERM",
                "outputs": sorted(set(states.values())), "stderr": err.strip()[-300:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    ns = p.parse_args(argv)
    rng = random.Random(ns.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the command's life without interruption, to spread the signal over all of it
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "torchbragg", *ARGS, "-floatfile", "x.f32"], cwd=folder,
                       stdout=subprocess.DEVNULL, check=True, env=env)
    life = time.monotonic() - t0
    results = []
    for _ in range(ns.trials):
        delay = rng.uniform(0.0, life * 1.05)
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        results.append(one_trial(rng, delay, sig, env))
    failed = [r for r in results if not r["ok"]]
    exits = {}
    for r in results:
        exits[str(r.get("exit"))] = exits.get(str(r.get("exit")), 0) + 1
    summary = {"trials": len(results), "failed": len(failed), "uninterrupted_life_s": round(life, 2),
               "exit_codes": exits,
               "outputs_old": sum(r.get("outputs") == ["old"] for r in results),
               "outputs_new": sum(r.get("outputs") == ["new"] for r in results),
               "stderr_lines_seen": sorted({r.get("stderr", "").split(":")[0] + ": " +
                                            r.get("stderr", "").split(": ", 1)[-1][:60]
                                            for r in results if r.get("stderr")})[:6]}
    for r in failed[:10]:
        print(json.dumps(r), file=sys.stderr)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
