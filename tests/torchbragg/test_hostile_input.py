"""Hostile input: every bad flag, file or signal ends in one error line, never a hang,
a traceback, a wrong image or a partial output set (specs/cli.md §1.4, §1.5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from torchbragg.cli.command import main

BASE = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-detpixels", "32"]


def run(args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, expected", [
    (["-twotheta", "90", "-detpixels", "128"], "automatic oversample"),
    (["-hdivsteps", "1e11"], "-hdivsteps: 1e11 is out of range"),
    (["-dispsteps", "1e30"], "-dispsteps: 1e30 is out of range"),
    (["-dispersion", "1", "-dispsteps", "100000000"], "dispersion steps would be 100000000"),
    (["-distance", "200", "-distance", "nan"], "-distance: expected a finite number, got nan"),
    (["-N", "inf"], "-N: expected a finite number, got inf"),
    (["-seed", "inf"], "-seed: expected a finite number"),
    (["-seed", "1e30"], "-seed: 1e30 is out of range"),
    (["-energy", "0"], "-energy: expected a positive photon energy"),
    (["-samplesize", "inf"], "-samplesize: expected a finite number"),
    (["-cell", "inf", "100", "100", "90", "90", "90"], "-cell: expected a finite number"),
    (["-cell", "100", "100", "100", "180", "180", "180"], "angles describe no unit cell"),
    (["-roi", "40", "50", "0", "10"], "starts outside the detector"),
    (["-roi", "10", "5", "0", "10"], "bounds are reversed"),
    (["-detpixels", "100000"], "fast axis would be 100000"),
    (["-oversample", "5000"], "-oversample would be 5000"),
    (["-mosaic", "1", "-mosaic_domains", "2000000"], "mosaic domains would be 2000000"),
    (["-oversample", "1000", "-detpixels", "4096", "-mosaic", "1", "-mosaic_domains", "1000"],
     "evaluations per pixel"),
    (["-chunk_rows", "-5"], "-chunk_rows: expected a positive number of rows, got -5"),
    (["-beamsize", "1e-300", "-flux", "1.5"], "the fluence"),
    (["-samplesize", "1e300"], "unit cells along a would be"),
    (["-osc", "-0", "-phistep", "329"], "no phi steps"),
    (["-round_xtal", "-fudge", "-1"], "-fudge -1: the width factor of the round lattice factor"),
    (["-gauss_xtal", "-fudge", "-2", "-oversample_omega"], "-fudge -2: the width factor of the gauss"),
    (["-point_pixel", "-oversample_omega", "-oversample", "8"], "or -fix_oversample"),
])
def test_bad_input_is_one_error_line(extra, expected, capsys):
    t0 = time.perf_counter()
    code, out, err = run(BASE + extra, capsys)
    assert code == 2
    assert time.perf_counter() - t0 < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchbragg: error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err + out


def test_negative_roi_bounds_follow_c(tmp_path, capsys):
    full, part = tmp_path / "full.f32", tmp_path / "neg.f32"
    assert run(BASE + ["-floatfile", str(full)], capsys)[0] == 0
    assert run(BASE + ["-roi", "-5", "-1", "-3", "-1", "-floatfile", str(part)], capsys)[0] == 0
    a, b = np.fromfile(full, "<f4"), np.fromfile(part, "<f4")
    assert np.isfinite(b).all() and b.max() > 0
    np.testing.assert_array_equal(a, b)


def test_chunk_rows_python_entry_rejects_negative():
    from torchbragg import Simulation
    from torchbragg.resolve import SetupError

    with pytest.raises(SetupError, match="chunk_rows"):
        Simulation.from_args(BASE, chunk_rows=-5)


def test_hkl_index_beyond_limit_names_line(tmp_path, capsys):
    hkl = tmp_path / "big.hkl"
    hkl.write_text("1 2 3 10\n1 2 9223372036854775808 10\n")
    code, _, err = run(["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(hkl), "-detpixels", "16"], capsys)
    assert code == 2 and f"{hkl}:2:" in err and "limit" in err and len(err.strip().splitlines()) == 1


def test_hkl_reader_is_bounded(monkeypatch, tmp_path):
    from torchbragg.io import hkl_table

    monkeypatch.setattr(hkl_table, "HKL_MAX_BYTES", 1000)
    t0 = time.perf_counter()
    with pytest.raises(hkl_table.HKLFormatError, match="larger than the limit"):
        hkl_table.read_hkl("/dev/zero")
    assert time.perf_counter() - t0 < 5
    monkeypatch.undo()
    long = tmp_path / "long.hkl"
    long.write_text("1 2 3 " + "1" * 5000 + "\n")
    with pytest.raises(hkl_table.HKLFormatError, match="longer than the limit"):
        hkl_table.read_hkl(long)


def test_outputs_are_one_transaction(tmp_path, capsys):
    ok = tmp_path / "ok.f32"
    ok.write_bytes(b"old")
    code, _, err = run(BASE + ["-floatfile", str(ok), "-intfile", str(tmp_path / "missing" / "x.img")], capsys)
    assert code == 2 and "-intfile" in err and "no such folder" in err
    assert ok.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.f32"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    from torchbragg.io import pgm

    ok = tmp_path / "ok.f32"
    ok.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pgm, "write_pgm", boom)
    code, _, err = run(BASE + ["-floatfile", str(ok), "-pgmfile", str(tmp_path / "p.pgm")], capsys)
    assert code == 2 and "disk full" in err
    assert ok.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.f32"]


@pytest.mark.parametrize("which", ["dir", "same", "input"])
def test_output_path_checks(tmp_path, which, capsys):
    hkl = tmp_path / "in.hkl"
    hkl.write_text("1 1 1 10\n")
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(hkl), "-detpixels", "16"]
    if which == "dir":
        args += ["-floatfile", str(tmp_path)]
        expect = "is a folder"
    elif which == "same":
        args += ["-floatfile", str(tmp_path / "a"), "-intfile", str(tmp_path / "a")]
        expect = "the same file as -floatfile"
    else:
        args += ["-floatfile", str(hkl)]
        expect = "the same file as the input -hkl"
    code, out, err = run(args, capsys)
    assert code == 2 and expect in err
    assert "solid angle" not in out  # refused before the render


def test_symlink_written_through_and_mode_kept(tmp_path, capsys):
    target = tmp_path / "target.f32"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link = tmp_path / "link.f32"
    link.symlink_to(target.name)
    assert run(BASE + ["-floatfile", str(link)], capsys)[0] == 0
    assert link.is_symlink()
    assert target.stat().st_size == 32 * 32 * 4
    assert (target.stat().st_mode & 0o777) == 0o600


def test_cancel_between_staging_and_commit_keeps_old_files(tmp_path):
    from torchbragg.io.atomic_io import OutputSet, atomic_write_bytes

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old-a")
    with pytest.raises(KeyboardInterrupt):
        with OutputSet():
            atomic_write_bytes(a, b"new-a")
            atomic_write_bytes(b, b"new-b")
            raise KeyboardInterrupt
    assert a.read_bytes() == b"old-a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with OutputSet():
        atomic_write_bytes(a, b"new-a")
        atomic_write_bytes(b, b"new-b")
    assert a.read_bytes() == b"new-a" and b.read_bytes() == b"new-b"


def _tap_bundle(tmp_path, mutate):
    from torchbragg import Simulation
    from torchbragg.report_bundle import new_bundle
    from torchbragg.taps import write_tap_json

    sim = Simulation.from_args(BASE + ["-oversample", "1"])
    tap = sim.tap(16, 16)
    bundle = new_bundle(tmp_path / "rep" / "p")
    path = write_tap_json(tap, bundle / "py_taps", tap_id="hkl_subpixel")
    doc = json.loads(Path(path).read_text())
    c = {"configs": {"x": {"args": doc["config"]["args"], "pixels": [{
        "pixel_slow_fast": [16, 16], "pixel_value": doc["final_intensity"],
        "rows": [{"thick": r["thick"], "subS": r["subpixel_index"][0], "subF": r["subpixel_index"][1],
                  "source": r["source"], "phi": r["phi"], "mos": r["mosaic"],
                  "h": r["hkl_fractional"][0], "k": r["hkl_fractional"][1], "l": r["hkl_fractional"][2],
                  "h0": r["hkl_rounded"][0], "k0": r["hkl_rounded"][1], "l0": r["hkl_rounded"][2],
                  "F_cell": r["F_cell"], "F_latt": r["F_latt"], "oob": int(r["out_of_bounds"])}
                 for r in doc["values"]["subpixels"]]}]}}}
    doc, c = mutate(doc, c)
    Path(path).write_text(json.dumps(doc))
    cpath = tmp_path / "c.json"
    cpath.write_text(json.dumps(c))
    return bundle, cpath


def test_audit_passes_clean_and_fails_nan(tmp_path):
    from torchbragg.tap_audit import write_audit

    bundle, cpath = _tap_bundle(tmp_path / "a", lambda d, c: (d, c))
    assert "No mismatch" in write_audit(bundle, cpath).read_text()

    def nan_intensity(d, c):
        d["final_intensity"] = float("nan")
        return d, c

    bundle, cpath = _tap_bundle(tmp_path / "b", nan_intensity)
    text = write_audit(bundle, cpath).read_text()
    assert "No mismatch" not in text and "non-finite" in text

    def nan_h_in_c(d, c):
        c["configs"]["x"]["pixels"][0]["rows"][0]["h"] = float("nan")
        return d, c

    bundle, cpath = _tap_bundle(tmp_path / "c", nan_h_in_c)
    assert "No mismatch" not in write_audit(bundle, cpath).read_text()


@pytest.mark.parametrize("mutate", [
    lambda d, c: ({**d, "pixel_coords": 5}, c),
    lambda d, c: ({**d, "values": []}, c),
    lambda d, c: ({k: v for k, v in d.items() if k != "config"}, c),
    lambda d, c: (d, {"configs": []}),
    lambda d, c: (d, {"configs": {"x": {"args": d["config"]["args"]}}}),
    lambda d, c: (d, {"configs": {"x": {"args": d["config"]["args"], "pixels": [{"pixel_slow_fast": [16, 16]}]}}}),
    lambda d, c: (d, [1, 2]),
    # Infinity (valid in Python's JSON) where a flag belongs: found by the fuzz run
    lambda d, c: ({**d, "values": {**d["values"], "subpixels": [{**r, "out_of_bounds": float("inf")}
                                                                for r in d["values"]["subpixels"]]}}, c),
])
def test_audit_malformed_inputs_are_one_line(tmp_path, mutate, capsys):
    from torchbragg.cli.tap import main as tap_main

    bundle, cpath = _tap_bundle(tmp_path, mutate)
    code = tap_main(["audit", str(bundle), "--c-taps", str(cpath)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bragg-tap: error: ") and "malformed" in lines[0] or \
        "configs" in lines[0], err


def test_bragg_tap_cuda_on_cpu_build(capsys):
    import torch

    from torchbragg.cli.tap import main as tap_main

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert tap_main(["--pixel", "1", "1", "--device", "cuda", "--"] + BASE) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bragg-tap: error: --device cuda: CUDA is not available on this machine"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_render_exits_cleanly(tmp_path, sig, code):
    out = tmp_path / "out.f32"
    out.write_bytes(b"old")
    # a render of several seconds, interrupted once it has started
    proc = subprocess.Popen([sys.executable, "-m", "torchbragg", "-cell", "100", "100", "100", "90", "90", "90",
                             "-default_F", "100", "-detpixels", "1024", "-oversample", "12", "-dtype", "float64",
                             "-floatfile", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TORCHBRAGG_FAST": "0"})
    for line in proc.stdout:
        if "oversample steps" in line:
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.f32"]


@pytest.mark.parametrize("delay", [0.3, 4.0])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bragg_tap_signal_exits_cleanly(tmp_path, sig, code, delay):
    # at start-up (importing torch) and later (set-up and tap of a large configuration)
    out = tmp_path / "taps"
    out.mkdir()
    script = Path(sys.executable).with_name("bragg-tap")  # the console script, as users start it
    if not script.exists():
        pytest.skip("bragg-tap console script not installed beside the interpreter")
    proc = subprocess.Popen([str(script), "--pixel", "100", "100", "--out-dir", str(out), "--",
                             "-cell", "100", "100", "100",
                             "90", "90", "90", "-default_F", "100", "-detpixels", "2048", "-oversample", "64",
                             "-mosaic", "1", "-mosaic_domains", "50"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("bragg-tap: "), err
    assert list(out.iterdir()) == []


def test_source_file_and_smv_header_are_bounded(tmp_path, capsys, monkeypatch):
    import torchbragg.resolve as tb_setup
    from torchbragg.io.smv import SMVFormatError, read_smv_header

    code, _out, err = run(BASE + ["-sourcefile", "/dev/zero"], capsys)
    assert code == 2 and "-sourcefile /dev/zero: not a regular file" in err
    many = tmp_path / "many.txt"
    many.write_text("0 0 -1 1 1e-10\n" * 12)
    monkeypatch.setitem(tb_setup.LIMITS, "sources", 10)
    code, _out, err = run(BASE + ["-sourcefile", str(many)], capsys)
    assert code == 2 and "more than 10 sources (line 11)" in err
    monkeypatch.setattr(tb_setup, "SOURCE_FILE_MAX_BYTES", 100)
    code, _out, err = run(BASE + ["-sourcefile", str(many)], capsys)
    assert code == 2 and "180 bytes, above the limit of 100" in err

    huge = tmp_path / "huge.img"
    huge.write_bytes(b"{\nHEADER_BYTES=999999999;\n}\n" + b"\0" * 600)
    with pytest.raises(SMVFormatError, match="above the limit"):
        read_smv_header(huge)


def test_thick_sensor_facing_away_is_an_error(capsys):
    # found by the fuzz run: a grazing view of the back of a thick sensor gave NaN pixels
    code, _out, err = run(BASE + ["-twotheta", "215.9", "-Ybeam", "2147483648", "-detector_thick", "100"], capsys)
    assert code == 2 and "-detector_thick 100: the sensor faces away from the sample" in err
    code, _out, err = run(BASE + ["-twotheta", "215.9", "-floatfile", "/dev/null"], capsys)  # thin: as in C
    assert code == 0, err


@pytest.mark.parametrize("fast", ["0", "1"])
def test_curved_thick_sensor_seen_from_behind_captures_nothing(monkeypatch, fast):
    # the second fuzz run's finding: NaN pixels where rays meet a thick curved sensor from behind
    import torch

    import torchbragg

    monkeypatch.setenv("TORCHBRAGG_FAST", fast)
    sim = torchbragg.Simulation.from_args(BASE + ["-detpixels", "24", "-curved_det", "-beam_vector", "65537", "0",
                                                  "-2147483649", "-detector_thick", "219.4"], dtype=torch.float64)
    img = sim.render()
    assert bool(torch.isfinite(img).all()) and float(img.min()) >= 0.0
    assert int((img == 0).sum()) > 0  # the pixels behind the sensor
    # a sane thick curved detector is unchanged: every subpixel in front of the sensor
    ok = torchbragg.Simulation.from_args(BASE + ["-curved_det", "-detector_thick", "100"], dtype=torch.float64)
    assert float(ok.render().min()) > 0.0


def test_huge_direction_vectors_are_normalised_without_overflow(capsys):
    import warnings

    from torchbragg.rotations import unit

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning
        np.testing.assert_allclose(unit([1e200, 0.0, 1e200]), [2 ** -0.5, 0.0, 2 ** -0.5])
        np.testing.assert_allclose(unit([1e-200, 0.0, 0.0]), [1.0, 0.0, 0.0])
    assert unit([3.0, 4.0, 0.0]).tolist() == [0.6, 0.8, 0.0]
    code, _out, err = run(BASE + ["-beam_vector", "1e200", "0", "0", "-floatfile", "/dev/null"], capsys)
    assert code == 0 and "warning" not in err, err
