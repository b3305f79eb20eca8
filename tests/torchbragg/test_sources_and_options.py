"""Sources from a file, -dmin, -printout_pixel and -write_fdump."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

import torchbragg
from torchbragg.cli.command import main
from torchbragg.io.hkl_table import read_fdump, read_hkl

BASE = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1",
        "-distance", "100", "-detpixels", "48", "-pixel", "0.8", "-oversample", "1"]


def test_sourcefile_with_the_beam_source_equals_the_default_render(tmp_path):
    # one source 10 m up-beam (MOSFLM beam along +x), weight 1, wavelength 1 Å in metres
    (tmp_path / "one.txt").write_text("# X Y Z I lambda\n-10 0 0 1 1e-10\n")
    plain = torchbragg.Simulation.from_args(BASE, dtype=torch.float64).render()
    from_file = torchbragg.Simulation.from_args(BASE + ["-sourcefile", "one.txt"], cwd=tmp_path,
                                                dtype=torch.float64).render()
    assert torch.allclose(plain, from_file, rtol=1e-12, atol=0)


def test_sourcefile_two_sources_average_like_steps(tmp_path):
    # C divides by steps = sources × ...: two identical sources give the same image as one
    (tmp_path / "two.txt").write_text("-10 0 0 1 1e-10\n-10,0,0,1,1e-10\n")
    one = torchbragg.Simulation.from_args(BASE, dtype=torch.float64).render()
    sim = torchbragg.Simulation.from_args(BASE + ["-sourcefile", "two.txt"], cwd=tmp_path, dtype=torch.float64)
    assert len(sim.setup.source_lambdas) == 2
    assert torch.allclose(one, sim.render(), rtol=1e-12, atol=0)
    # missing columns take C's defaults (along the beam, lambda0)
    (tmp_path / "short.txt").write_text("-10 0 0\n")
    sim = torchbragg.Simulation.from_args(BASE + ["-sourcefile", "short.txt"], cwd=tmp_path, dtype=torch.float64)
    assert sim.setup.source_lambdas[0] == pytest.approx(1e-10)


def test_sourcefile_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_text("-10 0 0 1 1e-10\n-10 zero 0 1 1e-10\n")
    with pytest.raises(torchbragg.SetupError, match=r"bad.txt:2: .*zero"):
        torchbragg.Simulation.from_args(BASE + ["-sourcefile", "bad.txt"], cwd=tmp_path)


def test_dmin_skips_high_angle_pixels():
    full = torchbragg.Simulation.from_args(BASE, dtype=torch.float64).render().numpy()
    sim = torchbragg.Simulation.from_args(BASE + ["-dmin", "6"], dtype=torch.float64)
    cut = sim.render().numpy()
    # resolution of every pixel centre: d = lambda / (2 sin(theta))
    ny, nx = cut.shape
    d = np.array([[sim.tap(s, f, taps=("geometry",)).geometry["d_angstrom"] or math.inf
                   for f in range(0, nx, 6)] for s in range(0, ny, 6)])
    sub_full, sub_cut = full[::6, ::6], cut[::6, ::6]
    assert np.all(sub_cut[d < 5.5] == 0) and np.all(sub_full[d < 5.5] > 0)
    assert np.allclose(sub_cut[d > 6.5], sub_full[d > 6.5], rtol=1e-12)


def test_printout_pixel_prints_the_tap_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(BASE + ["-printout_pixel", "5", "7"]) == 0
    text = buf.getvalue()
    assert "pixel (slow=7, fast=5)" in text and "default_F:no_table" in text


def test_write_fdump_round_trips_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.hkl").write_text("0 0 0 3\n1 0 0 4\n0 1 -1 5\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(BASE + ["-hkl", "t.hkl", "-write_fdump", "dump.bin"]) == 0
    table = read_fdump(tmp_path / "dump.bin", default_F=100)
    assert table.same_values(read_hkl(tmp_path / "t.hkl", 100))
    # the engine never writes ./Fdump.bin by itself (the C program does, and later reads it back silently)
    assert not (tmp_path / "Fdump.bin").exists()
