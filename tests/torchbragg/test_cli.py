"""The ``torchbragg`` command: a drop-in for the nanoBragg program.

Runs the installed console script (or ``python -m torchbragg``) as a subprocess on
a small golden case and checks what C printed and wrote: the statistics lines of
its log.txt, the raw float image, the SMV ``-intfile`` (byte for byte), error exits
and ``torchbragg compare``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.cli.command import main, run_simulation
from torchbragg.io.smv import read_smv

CASE = "cubic_hkl_mosflm"


def command():
    """The console script next to this Python, else ``python -m torchbragg``."""
    script = Path(sys.executable).parent / "torchbragg"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "torchbragg"]


def run(args, cwd, cmd=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run((cmd or command()) + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def numbers(line):
    return [float(v) for v in re.findall(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", line)]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, reference_case):
    """The command run once on the small case, writing a float image and an SMV image."""
    case = reference_case(CASE)
    folder = tmp_path_factory.mktemp("cli")
    case.stage(folder)
    proc = run(case.args + ["-floatfile", "out.bin", "-intfile", "img.smv"], folder)
    return case, folder, proc


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "torchbragg").is_file(), "pip install -e . provides the torchbragg script"


def test_prints_the_c_statistics(cli_run):
    case, _, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    c_log = case.log()
    for key in ("max_I = ", "mean= "):
        mine = next(l for l in out.splitlines() if l.startswith(key))
        theirs = next(l for l in c_log.splitlines() if l.startswith(key))
        # same layout (C's "max_I = %g  at %g %g", "mean= %g rms= %g rmsd= %g") and values
        assert re.sub(r"[-+0-9.e]+", "#", mine) == re.sub(r"[-+0-9.e]+", "#", theirs), (mine, theirs)
        assert np.allclose(numbers(mine), numbers(theirs), rtol=1e-5, atol=0), (mine, theirs)
    assert "max_I = 2117.99  at 0.0514 0.0514" in out


def test_floatfile_is_the_in_process_render(cli_run):
    case, folder, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    written = np.fromfile(folder / "out.bin", "<f4")
    assert written.size == case.shape[0] * case.shape[1]
    sim = torchbragg.Simulation.from_args(case.args, cwd=folder, dtype=torch.float32)
    image = sim.render().numpy()
    assert np.array_equal(written.reshape(case.shape), image)


def test_intfile_is_byte_identical_to_c(cli_run):
    case, folder, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert (folder / "img.smv").read_bytes() == (case.folder / "img.smv").read_bytes()
    assert "intfile_scale = 25.968" in proc.stdout


def test_unknown_flag_exits_2_with_one_line(tmp_path):
    proc = run(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1", "-tophat_xtal"], tmp_path,
               cmd=[sys.executable, "-m", "torchbragg"])
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "-tophat_xtal" in err and "-tophat_spots" in err
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_hkl_line_exits_2_naming_file_line_and_text(tmp_path):
    (tmp_path / "bad.hkl").write_text("0 0 0 10\n1 0 0 5\n1 2 x 4\n0 1 0 3\n")
    proc = run(["-cell", "100", "100", "100", "90", "90", "90", "-hkl", "bad.hkl", "-N", "2", "-detpixels", "8"],
               tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "bad.hkl:3" in err and "1 2 x 4" in err


def test_compare_two_golden_images(cli_run, tmp_path):
    case, folder, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    ref = case.folder / case.entry["float_image"]
    done = run(["compare", ref, folder / "out.bin", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    c = np.fromfile(ref, "<f4").astype(np.float64)
    mine = np.fromfile(folder / "out.bin", "<f4").astype(np.float64)
    assert stats["correlation"] == pytest.approx(np.corrcoef(c, mine)[0, 1], abs=1e-12)
    assert stats["correlation"] >= 0.9999
    assert stats["sum_ratio"] == pytest.approx(mine.sum() / c.sum(), rel=1e-9)
    text = run(["compare", ref, folder / "out.bin"], tmp_path)
    assert text.returncode == 0 and "PASS" in text.stdout


def test_compare_bad_input_exits_2(tmp_path):
    (tmp_path / "a.bin").write_bytes(np.zeros(16, "<f4").tobytes())
    done = run(["compare", tmp_path / "a.bin", tmp_path / "missing.bin"], tmp_path)
    assert done.returncode == 2 and "missing.bin" in done.stderr


# --------------------------------------------------------------------------- C output rules, in process
SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1",
         "-distance", "100", "-detpixels", "32", "-pixel", "0.5"]


def _run_in(folder, monkeypatch, args):
    monkeypatch.chdir(folder)
    out = io.StringIO()
    assert run_simulation(args, out=out) == 0
    return out.getvalue()


def test_noise_and_float_outside_roi_are_zero(tmp_path, monkeypatch):
    _run_in(tmp_path, monkeypatch, SMALL + ["-roi", "3", "10", "5", "12", "-floatfile", "f.bin",
                                            "-noisefile", "n.smv", "-seed", "3"])
    inside = np.zeros((32, 32), bool)
    inside[5:13, 3:11] = True
    f = np.fromfile(tmp_path / "f.bin", "<f4").reshape(32, 32)
    _, noise = read_smv(tmp_path / "n.smv")
    assert (f[~inside] == 0).all() and (f[inside] > 0).all()
    # C's noise loop visits the ROI only; the rest of its buffer is still zero
    assert (noise[~inside] == 0).all() and (noise[inside] >= 40).all()


def test_intfile_outside_roi_is_zero(tmp_path, monkeypatch):
    # C converts only ROI pixels into its zero-filled -intfile buffer: 0 outside, not adc_offset
    _run_in(tmp_path, monkeypatch, SMALL + ["-roi", "3", "10", "5", "12", "-intfile", "i.smv"])
    _, ints = read_smv(tmp_path / "i.smv")
    inside = np.zeros((32, 32), bool)
    inside[5:13, 3:11] = True
    assert (ints[inside] >= 40).all()
    assert (ints[~inside] == 0).all(), f"outside the ROI: {np.unique(ints[~inside])}"


def _c_statistics(image, rendered, roi):
    """C's printed statistics: mean and rms over rendered pixels; rmsd over every ROI pixel."""
    vals = image[rendered]
    n = vals.size
    mean = vals.sum() / n
    rms = np.sqrt((vals ** 2).sum() / (n - 1))
    around = image[roi] - mean
    rmsd = np.sqrt((around ** 2).sum() / (roi.sum() - 1))
    return mean, rms, rmsd


def test_statistics_with_roi_follow_c():
    sim = torchbragg.Simulation.from_args(SMALL + ["-roi", "3", "10", "5", "12"], dtype=torch.float64)
    image = sim.render().numpy().astype(np.float32).astype(np.float64)  # C's float image
    roi = np.zeros((32, 32), bool)
    roi[5:13, 3:11] = True
    st = sim.last_stats
    assert (st.mean, st.rms, st.rmsd) == pytest.approx(_c_statistics(image, roi, roi), rel=1e-12)
    assert st.max_I == pytest.approx(image.max(), rel=1e-12)


def test_statistics_with_mask_follow_c(tmp_path):
    from torchbragg.io.smv import write_smv

    mask = np.ones((24, 32), np.uint16)
    mask[3:6, 4:9] = 0
    mask[10, :] = 0
    write_smv(tmp_path / "mask.smv", mask, {})
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-pixel", "0.5",
            "-distance", "100", "-mask", "mask.smv"]
    sim = torchbragg.Simulation.from_args(args, cwd=tmp_path, dtype=torch.float64)
    image = sim.render().numpy().astype(np.float32).astype(np.float64)  # C's float image
    st = sim.last_stats
    mean, rms, rmsd = _c_statistics(image, mask != 0, np.ones_like(mask, bool))
    assert st.mean == pytest.approx(mean, rel=1e-12) and st.rms == pytest.approx(rms, rel=1e-12)
    assert st.rmsd == pytest.approx(rmsd, rel=1e-12)


def test_main_prints_to_the_current_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(SMALL) == 0
    assert "max_I = " in buf.getvalue()


def test_no_compiler_is_one_warning_line_that_says_what_to_install(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "TORCHBRAGG_FAST")}
    env.update(PATH=str(Path(sys.executable).parent), TORCHBRAGG_CACHE_DIR=str(tmp_path / "empty_cache"))
    proc = subprocess.run([sys.executable, "-m", "torchbragg", "-cell", "100", "100", "100", "90", "90", "90",
                           "-default_F", "10", "-N", "3", "-detpixels", "16", "-floatfile", str(tmp_path / "x.f32")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("torchbragg: warning: ") and "install g++" in lines[0]
    assert ".py" not in lines[0]  # no source path and line number
    assert (tmp_path / "x.f32").stat().st_size == 16 * 16 * 4
