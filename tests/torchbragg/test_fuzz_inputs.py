"""A bounded fuzz run (fixed seeds, worker process with a memory limit): scripts/fuzz_inputs.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_inputs.py"


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_finds_nothing(seed):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seed", str(seed), "--seconds", "20", "--max-cases", "1500",
                           "--mem-mib", "3072", "--case-timeout", "30"], capture_output=True, text=True, timeout=200)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    findings = [line for line in proc.stderr.splitlines() if line.startswith('{"case"')]
    assert proc.returncode == 0 and report["findings"] == 0, findings[:3]
    assert report["cases"] > 50
    assert any(k.startswith("error:") for k in report["counts"]) and report["counts"].get("ok", 0) > 0
