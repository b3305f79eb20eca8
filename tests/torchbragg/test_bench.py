"""``torchbragg bench`` and the fused render kernel it measures.

No timing thresholds here: the bench must run end to end and write a valid
report, and the fused kernel must give the eager kernel's image (to float
rounding), fallback map and statistics, whatever the block size or thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchbragg
from torchbragg import simulation as simulation_module
from torchbragg.cli import bench
from torchbragg.cli import command as cli
from torchbragg.interpolation_switch_off import InterpolationSwitchOff
from torchbragg.kernels import cpu as cpu_kernel
from torchbragg.kernels import packing
from torchbragg.kernels.build import NO_COMPILER_MESSAGE, slow_path_note

MOSAIC_PHI = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1.0",
              "-mosaic", "0.5", "-mosaic_dom", "5", "-phi", "0", "-osc", "0.5", "-phisteps", "3",
              "-distance", "100", "-detpixels", "48", "-pixel", "0.5", "-seed", "1", "-mosaic_seed", "7"]
TAP_SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5", "-default_F", "100", "-lambda", "0.5",
             "-distance", "500", "-pixel", "0.8", "-detpixels", "64", "-oversample", "2"]


def _table_args(tmp_path, extra=()):
    hkl = tmp_path / "t.hkl"
    hkl.write_text("".join(f"{h} {k} {l} {10 + h + 2 * k + 3 * l}\n" for h in range(-2, 3) for k in range(-2, 3)
                           for l in range(-2, 3) if (h + k + l) % 2 == 0))
    return ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(hkl), "-default_F", "50", "-N", "3",
            "-lambda", "1.0", "-distance", "100", "-detpixels", "64", "-pixel", "0.8", *extra]


def _render(args, fast, dtype=torch.float32, chunk_rows=None, fallback=False):
    sim = torchbragg.Simulation.from_args(args, dtype=dtype, chunk_rows=chunk_rows)
    sim.use_compiled_kernels = fast
    if fallback:
        image, fmap = sim.render_with_fallback()
    else:
        image, fmap = sim.render(), None
    return sim, image, fmap


# --------------------------------------------------------------------------- fast == eager
@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ["mosaic_phi", "tap_small", "table", "table_dmin_polar", "round", "gauss",
                                  "tophat", "thick_roi"])
def test_fast_path_equals_eager_path(tmp_path, case, dtype):
    args = {"mosaic_phi": MOSAIC_PHI, "tap_small": TAP_SMALL,
            "table": _table_args(tmp_path),
            "table_dmin_polar": _table_args(tmp_path, ["-dmin", "3", "-polar", "0.8", "-dispersion", "5",
                                                       "-dispsteps", "2"]),
            "round": TAP_SMALL + ["-round_xtal"], "gauss": TAP_SMALL + ["-gauss_xtal"],
            "tophat": TAP_SMALL + ["-tophat_spots"],
            "thick_roi": TAP_SMALL + ["-detector_abs", "500", "-detector_thick", "100", "-detector_thicksteps", "2",
                                      "-roi", "3", "50", "5", "60"]}[case]
    eager_sim, eager, eager_map = _render(args, False, dtype, fallback=True)
    fast_sim, fast, fast_map = _render(args, True, dtype, fallback=True)
    assert fast_sim.compiled_plan() is not None and eager_sim.compiled_plan() is None
    scale = float(eager.abs().max())
    assert scale > 0
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(fast, eager, rtol=tol, atol=tol * scale), float((fast - eager).abs().max() / scale)
    assert torch.equal(fast_map.counts, eager_map.counts)
    assert torch.equal(fast_map.reason, eager_map.reason)
    a, b = eager_sim.last_stats, fast_sim.last_stats
    assert b.pixels == a.pixels
    for key in ("max_I", "mean", "rms", "rmsd", "solid_angle_sr"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=10 * tol), key


@pytest.mark.usefixtures("needs_fast")
def test_fast_path_does_not_depend_on_block_size_or_threads(monkeypatch):
    _, reference, ref_map = _render(MOSAIC_PHI, True, fallback=True)
    for evals, threads in ((1, 1), (5 * 48 * 45, 2), (1 << 30, 3)):
        monkeypatch.setattr(simulation_module, "FAST_EVALUATIONS_PER_CHUNK", evals)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _, image, fmap = _render(MOSAIC_PHI, True, fallback=True)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(image, reference), (evals, threads)
        assert torch.equal(fmap.counts, ref_map.counts)


@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("chunk_rows", [1, 7])
def test_fast_path_equals_eager_for_two_chunk_sizes(chunk_rows, monkeypatch):
    """Eager chunks of ``chunk_rows`` rows, fused blocks of about ``chunk_rows`` rows."""
    sim = torchbragg.Simulation.from_args(MOSAIC_PHI)
    E = sim.evaluations_per_pixel
    monkeypatch.setattr(simulation_module, "FAST_EVALUATIONS_PER_CHUNK", chunk_rows * 48 * E)
    _, eager, _ = _render(MOSAIC_PHI, False, chunk_rows=chunk_rows)
    _, fast, _ = _render(MOSAIC_PHI, True, chunk_rows=chunk_rows)
    _, eager_default, _ = _render(MOSAIC_PHI, False)
    assert torch.equal(eager, eager_default)
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-5 * float(eager.max()))


@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("table", ["switch_off_first_pixel", "switch_off_mid_image", "never_switches_off"])
def test_fast_path_with_interpolation(tmp_path, table, dtype):
    """Rows before C's interpolation switch-off interpolate (fused), its row is eager, later rows are nearest."""
    if table == "switch_off_first_pixel":
        args = _table_args(tmp_path, ["-interpolate"])
    else:
        kmin = -4 if table == "switch_off_mid_image" else -9
        lines = [f"{h} {k} {l} {20.0 + h + 2.0 * k + 0.5 * l * l + 0.25 * h * k:.10g}\n"
                 for h in range(-9, 10) for k in range(kmin, 10) for l in range(-12, 13)]
        (tmp_path / "k.hkl").write_text("".join(lines))
        args = ["-cell", "20", "20", "20", "90", "90", "90", "-hkl", str(tmp_path / "k.hkl"), "-default_F", "5",
                "-N", "2", "-lambda", "1", "-distance", "50", "-detpixels_f", "96", "-detpixels_s", "48",
                "-pixel", "0.5", "-interpolate", "-oversample", "2"]
    eager_sim, eager, eager_map = _render(args, False, dtype, fallback=True)
    fast_sim, fast, fast_map = _render(args, True, dtype, fallback=True)
    cutoff = fast_sim.interpolation_cutoff()
    modes = [m for m, _, _ in fast_sim._row_segments(fast_sim.compiled_plan(), False, cutoff, 0, 47, 96)]
    if table == "never_switches_off":
        assert cutoff is None and modes == ["interp"]
    elif table == "switch_off_mid_image":
        assert modes == ["interp", "eager", "fast"]
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(fast, eager, rtol=tol, atol=tol * float(eager.max()))
    assert torch.equal(fast_map.counts, eager_map.counts) and torch.equal(fast_map.reason, eager_map.reason)


def test_environment_switches_the_fast_path_off(monkeypatch):
    monkeypatch.setenv("TORCHBRAGG_FAST", "0")
    sim = torchbragg.Simulation.from_args(TAP_SMALL)
    assert sim.compiled_plan() is None
    image = sim.render()
    monkeypatch.setenv("TORCHBRAGG_FAST", "1")
    if cpu_kernel.cpu_render_function(torch.float32, "square", False, False) is not None:
        assert sim.compiled_plan() is not None
        assert torch.allclose(sim.render(), image, rtol=1e-5, atol=1e-5 * float(image.max()))


def test_no_compiler_falls_back_to_the_eager_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_libraries", {})
    monkeypatch.setattr(cpu_kernel, "_errors", {})
    monkeypatch.setattr(cpu_kernel, "cxx_compiler", lambda: None)
    monkeypatch.setenv("TORCHBRAGG_CACHE_DIR", str(tmp_path / "empty-cache"))
    sim = torchbragg.Simulation.from_args(TAP_SMALL)
    with pytest.warns(RuntimeWarning, match=r"rendering uses the slower PyTorch path .*: no C\+\+ compiler found"):
        image = sim.render()
    assert cpu_kernel.cpu_kernel_error(torch.float32, "square", False, False) == NO_COMPILER_MESSAGE
    # the one plain line the command line and the inspector show: what happened, why and what to do
    assert sim.last_kernel == "eager kernel"
    assert sim.last_kernel_note == slow_path_note(NO_COMPILER_MESSAGE)
    assert "\n" not in sim.last_kernel_note and "bash scripts/bootstrap.sh" in sim.last_kernel_note
    monkeypatch.setenv("TORCHBRAGG_FAST", "0")
    chosen = torchbragg.Simulation.from_args(TAP_SMALL)
    assert torch.equal(chosen.render(), image)
    assert chosen.last_kernel_note is None  # the PyTorch path by choice: nothing to say


def test_no_compiler_is_one_plain_line_from_the_command_line(tmp_path):
    """A fresh machine without g++: the command says so in one line and still writes the image."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(Path(sys.executable).parent), TORCHBRAGG_CACHE_DIR=str(tmp_path / "empty-cache"),
               TORCHBRAGG_FAST="1")
    exe = Path(sys.executable).with_name("torchbragg")
    proc = subprocess.run([str(exe), *TAP_SMALL, "-floatfile", "img.bin"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"torchbragg: warning: {slow_path_note(NO_COMPILER_MESSAGE)}"], proc.stderr
    assert (tmp_path / "img.bin").stat().st_size == 4 * 64 * 64


# --------------------------------------------------------------------------- the bench command
@pytest.mark.slow
def test_bench_command_writes_a_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHBRAGG_CACHE_DIR", str(tmp_path / "kernel-cache"))
    # a stand-in for the C program: records its arguments and thread setting
    fake_c = tmp_path / "nanoBragg"
    log = tmp_path / "c_calls.txt"
    fake_c.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS $*" >> "{log}"\n')
    fake_c.chmod(0o755)
    out = tmp_path / "reports"
    rc = cli.main(["bench", "--configs", "tap128", "--dtype", "float32", "--repeats", "2",
                   "--out", str(out), "--quiet", "--c-binary", str(fake_c)])
    text = capsys.readouterr().out
    assert rc == 0, text
    reports = list(out.glob("*/bench.json"))
    assert len(reports) == 1 and str(reports[0]) in text
    doc = json.loads(reports[0].read_text())
    assert doc["schema"] == bench.SCHEMA
    assert doc["host"]["cpu_count"] >= 1 and doc["options"]["dtypes"] == ["float32"]
    entry = doc["configs"]["tap128"]
    assert entry["args"] == bench.CONFIGS["tap128"]
    run = entry["runs"]["float32"]
    for key in ("first_ever", "cli_cold"):
        assert run[key]["returncode"] == 0, run[key]
        assert run[key]["wall_s"] > 0 and run[key]["peak_rss_mib"] > 0
    r = run["render"]
    assert r["process"]["returncode"] == 0
    for key in ("startup_import_s", "setup_s", "first_render_s", "warm_min_s", "warm_median_s", "ns_per_eval",
                "cpu_ns_per_eval", "tap_s", "tap_first_s", "peak_rss_self_mib"):
        assert isinstance(r[key], float) and r[key] >= 0, key
    assert len(r["warm_s"]) == 2 and r["evaluations"] == 128 * 128 * 4
    assert r["tap_method"] in ("sim.tap", "sim.evaluate(detail=True)") and r["tap_pixel"] == [64, 64]
    assert r["fast_kernel"] is True
    assert (r["kernel"], r["last_kernel"]) == ("CpuPlan", "fused CPU kernel")
    # the PyTorch path (what a machine without a compiler renders with), timed beside it
    pp = run["pytorch_path"]
    assert pp["process"]["returncode"] == 0 and pp["last_kernel"] == "eager kernel"
    assert pp["over_compiled"] == pytest.approx(pp["render_min_s"] / r["warm_min_s"]) and pp["over_compiled"] > 1
    assert f"{pp['over_compiled']:.1f}x the compiled kernel's warm render" in text
    calls = log.read_text().splitlines()
    assert calls == [f"1 {' '.join(bench.CONFIGS['tap128'])}", f"{os.cpu_count()} {' '.join(bench.CONFIGS['tap128'])}"]
    c1 = entry["c"]["single_thread"]
    assert c1["returncode"] == 0 and c1["threads"] == 1 and entry["c"]["all_threads"]["threads"] == os.cpu_count()
    assert entry["ratios"]["float32_warm_over_c"] == pytest.approx(r["warm_min_s"] / c1["wall_s"])
    assert "float32_warm_over_c_all_threads" in entry["ratios"]
    # never overwrite: a second report in the same second gets its own folder
    path2 = bench._write_report(doc, str(out))
    assert path2 != reports[0] and json.loads(path2.read_text()) == doc


def test_bench_rejects_unknown_configs_and_bad_binaries(capsys, tmp_path):
    assert bench.main(["--configs", "nope"]) == 2
    assert "unknown configuration" in capsys.readouterr().err
    assert bench.main(["--c-binary", str(tmp_path / "missing")]) == 2
    assert bench.main(["--help"]) == 0
    assert "--c-seconds" in capsys.readouterr().out


def test_bench_table_formats_a_document():
    run = {"first_ever": {"wall_s": 3.0, "returncode": 0, "peak_rss_mib": 300.0},
           "cli_cold": {"wall_s": 2.0, "returncode": 0, "peak_rss_mib": 310.0},
           "render": {"process": {"wall_s": 4.0, "returncode": 0, "peak_rss_mib": 320.0}, "evaluations": 4,
                      "first_render_s": 0.5, "warm_min_s": 0.25, "ns_per_eval": 1.0, "cpu_ns_per_eval": 2.0,
                      "tap_s": 0.01, "fast_kernel": True}}
    doc = {"torchbragg": "0", "host": {"cpu": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2},
           "options": {"device": "cpu"},
           "configs": {"tap4096": {"runs": {"float32": run, "float64": run}, "float64_over_float32": 1.0,
                                   "c": {"single_thread": {"wall_s": 5.0, "source": "--c-seconds"}},
                                   "ratios": {"float32_warm_over_c": 0.05}}},
           "bragg_tap_process": {"skipped": "bragg-tap console script not installed"}}
    text = bench.format_table(doc)
    assert "tap4096" in text and "float64 / float32" in text and "C program single thread" in text
    assert "bragg-tap --pixel 2048 2048: skipped" in text


@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("extra", [[], ["-mask", "mask.smv"], ["-roi", "3", "20", "2", "15"],
                                   ["-mask", "mask.smv", "-roi", "1", "30", "0", "20", "-mosaic", "0.5",
                                    "-mosaic_dom", "3", "-phi", "0", "-osc", "0.5", "-phisteps", "2"]],
                         ids=["full", "mask", "roi", "mask_roi_mosaic"])
def test_fast_statistics_equal_the_image_statistics(tmp_path, extra, dtype):
    """The kernel's row sums give what Simulation._stats computes from the image (C's float image rules)."""
    import math

    import numpy as np

    from torchbragg.io.smv import write_smv

    mask = np.ones((24, 32), np.uint16)
    mask[3:6, 4:9] = 0
    mask[10, :] = 0
    mask[0, 0] = 0
    write_smv(tmp_path / "mask.smv", mask, {})
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-pixel", "0.5",
            "-distance", "100", *extra]
    sim = torchbragg.Simulation.from_args(args, cwd=tmp_path, dtype=dtype)
    assert sim.compiled_plan() is not None
    image = sim.render()
    fast = sim.last_stats
    ref = sim._stats(image, fast.solid_angle_sr * sim.setup.steps)
    assert (fast.max_pixel, fast.pixels) == (ref.max_pixel, ref.pixels)
    for key in ("max_I", "max_I_fast_m", "max_I_slow_m", "mean", "rms", "rmsd"):
        assert math.isclose(getattr(fast, key), getattr(ref, key), rel_tol=1e-12), key


# --------------------------------------------------------------------------- fallback map: counts dtype and flags
@pytest.mark.usefixtures("needs_fast")
def test_fallback_counts_are_the_smallest_integers_that_fit():
    assert packing.fallback_count_dtype(1) == packing.fallback_count_dtype(127) == torch.int8
    assert packing.fallback_count_dtype(128) == packing.fallback_count_dtype(32767) == torch.int16
    assert packing.fallback_count_dtype(32768) == torch.int32
    # 182^2 = 33124 subpixels per pixel: int32 counts, fused kernel and eager kernel agree
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1",
            "-distance", "100", "-detpixels", "2", "-pixel", "0.1", "-oversample", "182"]
    _, eager, eager_map = _render(args, False, fallback=True)
    sim, fast, fast_map = _render(args, True, fallback=True)
    assert sim.evaluations_per_pixel == 33124
    assert fast_map.counts.dtype == eager_map.counts.dtype == torch.int32
    assert torch.equal(fast_map.counts, eager_map.counts) and int(fast_map.counts[0, 0]) == 33124
    assert torch.equal(fast_map.reason, eager_map.reason)
    _, _, small = _render(TAP_SMALL, True, fallback=True)
    assert small.counts.dtype == torch.int8
    # 12^2 = 144 subpixels: int16, fused and eager agree
    mid = args[:-1] + ["12"]
    _, eager, eager_map = _render(mid, False, fallback=True)
    sim, fast, fast_map = _render(mid, True, fallback=True)
    assert fast_map.counts.dtype == eager_map.counts.dtype == torch.int16
    assert torch.equal(fast_map.counts, eager_map.counts) and int(fast_map.counts.max()) == 144


@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("default_F", ["0", "-3", "50"])
def test_fallback_flags_survive_signed_and_zero_structure_factors(tmp_path, default_F):
    """The count variant marks default_F entries by the sign bit of a copy of the table: negative, zero
    and default_F-valued listed entries must still count as listed, and the image must not change."""
    hkl = tmp_path / "s.hkl"
    rows = []
    for h in range(-2, 3):
        for k in range(-2, 3):
            for l in range(-2, 3):
                if (h + k + l) % 2:
                    continue  # unlisted
                F = [0.0, -7.5, float(default_F), 12.0][(h * 7 + k * 3 + l) % 4]
                rows.append(f"{h} {k} {l} {F}\n")
    hkl.write_text("".join(rows))
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", str(hkl), "-default_F", default_F, "-N", "3",
            "-lambda", "1.0", "-distance", "100", "-detpixels", "64", "-pixel", "0.8", "-nointerpolate"]
    _, eager, eager_map = _render(args, False, fallback=True)
    _, fast, fast_map = _render(args, True, fallback=True)
    _, plain, _ = _render(args, True)
    assert torch.equal(fast, plain)  # the flagged table squares to the same image
    scale = max(float(eager.abs().max()), 1e-30)
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(fast_map.counts, eager_map.counts) and torch.equal(fast_map.reason, eager_map.reason)
    assert set(torch.unique(fast_map.reason).tolist()) >= {2, 3}


# --------------------------------------------------------------------------- interpolation switch-off scan
def _interp_tables(tmp_path):
    def F(h, k, l):
        return 20.0 + h + 2.0 * k + 0.5 * l * l + 0.25 * h * k

    for name, kmin, kmax in (("k_short.hkl", -4, 7), ("k_wide.hkl", -9, 9)):
        (tmp_path / name).write_text("".join(f"{h} {k} {l} {F(h, k, l):.10g}\n" for h in range(-9, 10)
                                             for k in range(kmin, kmax + 1) for l in range(-12, 13)))
    (tmp_path / "t.hkl").write_text("".join(f"{h} {k} {l} {10 + h + 2 * k + 3 * l}\n" for h in range(-2, 3)
                                            for k in range(-2, 3) for l in range(-2, 3) if (h + k + l) % 2 == 0))


SCAN_BASE = ["-cell", "20", "20", "20", "90", "90", "90", "-default_F", "5", "-N", "2", "-lambda", "1",
             "-distance", "50", "-detpixels_f", "96", "-detpixels_s", "48", "-pixel", "0.5", "-interpolate",
             "-oversample", "2"]
SCAN_EXTRAS = {
    "plain": [],
    "mosaic_phi": ["-mosaic", "0.5", "-mosaic_dom", "3", "-phi", "0", "-osc", "2", "-phisteps", "3", "-seed", "1",
                   "-mosaic_seed", "7"],
    "phi_first": ["-phi", "0", "-osc", "10", "-phisteps", "2"],
    "roi": ["-roi", "5", "90", "20", "45"],
    "mask": ["-mask", "mask.smv"],
    "dmin": ["-dmin", "4"],
    "tophat": ["-tophat_spots", "-N", "5"],
    "gauss": ["-gauss_xtal", "-N", "8", "-fudge", "30"],
    "round": ["-round_xtal", "-N", "5"],
    "thick_dispersion": ["-detector_abs", "500", "-detector_thick", "100", "-detector_thicksteps", "2",
                         "-dispersion", "5", "-dispsteps", "2"],
    "oversample_omega": ["-oversample_omega"],
    "curved": ["-curved_det"],
}


@pytest.fixture
def scan_folder(tmp_path):
    import numpy as np

    from torchbragg.io.smv import write_smv

    _interp_tables(tmp_path)
    mask = np.ones((48, 96), np.uint16)
    mask[30:40, 5:60] = 0
    mask[35, :] = 0
    mask[0, 0] = 0
    write_smv(tmp_path / "mask.smv", mask, {})
    return tmp_path


#: every set-up in float32; in float64 those whose skip tests depend on the render precision
SCAN_CASES = [(e, torch.float32) for e in SCAN_EXTRAS] + [
    (e, torch.float64) for e in ("plain", "mosaic_phi", "tophat", "gauss", "dmin")]


@pytest.mark.usefixtures("needs_fast")
@pytest.mark.parametrize("table", ["t.hkl", "k_short.hkl", "k_wide.hkl"], ids=["first_pixel", "mid_image", "never"])
@pytest.mark.parametrize("extra, dtype", SCAN_CASES, ids=[f"{e}-{str(d)[6:]}" for e, d in SCAN_CASES])
def test_fused_switch_off_scan_equals_the_eager_scan(scan_folder, table, extra, dtype):
    args = SCAN_BASE + ["-hkl", table] + SCAN_EXTRAS[extra]

    def fresh():
        return torchbragg.Simulation.from_args(args, dtype=dtype, cwd=scan_folder)

    sim = fresh()
    ny, nx = sim.shape
    eager = sim.switch_off.scan_eager(0, ny)
    plan = sim.switch_off.scan_plan()
    assert plan is not None
    assert sim.switch_off.scan_compiled(plan, 0, ny) == eager
    # the proof never claims "never" where the scan switches off; the wide table is proved
    proof = sim.switch_off.table_holds_every_neighbourhood()
    assert not proof or eager is None
    if table == "k_wide.hkl" and extra != "curved":  # (a curved detector sees wider angles: no proof)
        assert eager is None and proof
    elif table == "k_short.hkl" and extra in ("plain", "dmin", "round", "oversample_omega"):
        E = sim.evaluations_per_pixel
        assert 30 <= eager // E // nx <= 40  # mid-image
    # the public entry point: every path gives the eager ordinal
    assert fresh().interpolation_cutoff() == eager
    # until_row: a scan up to a row, then the rest, as taps and renders ask
    for row in (0, 20, 35, 47):
        part = fresh()
        upto = part.interpolation_cutoff(until_row=row)
        expect = sim.switch_off.scan_eager(0, row + 1)
        assert upto == expect, row
        assert part.interpolation_cutoff() == eager, row
    # evaluations within rounding of C's tests go to the eager kernel: a wide margin makes many of them
    unsure = fresh()
    p = unsure.switch_off.scan_plan()
    p.dparams[packing.D_OFFSETS["scan_eps"]] = 0.3
    assert unsure.switch_off.scan_compiled(p, 0, ny) == eager


@pytest.mark.usefixtures("needs_fast")
def test_switch_off_scan_uses_the_proof_then_the_fused_scan(scan_folder, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eager scan used")

    wide = torchbragg.Simulation.from_args(SCAN_BASE + ["-hkl", "k_wide.hkl"], cwd=scan_folder)
    monkeypatch.setattr(cpu_kernel.CpuPlan, "scan", boom)
    monkeypatch.setattr(InterpolationSwitchOff, "scan_eager", boom)
    assert wide.interpolation_cutoff() is None  # proved: no scan at all
    monkeypatch.undo()
    short = torchbragg.Simulation.from_args(SCAN_BASE + ["-hkl", "k_short.hkl"], cwd=scan_folder)
    expect = short.switch_off.scan_eager(0, 48)
    monkeypatch.setattr(InterpolationSwitchOff, "scan_eager", boom)
    assert short.interpolation_cutoff() == expect
    monkeypatch.undo()
    # without the fused kernel the eager scan runs
    eager = torchbragg.Simulation.from_args(SCAN_BASE + ["-hkl", "k_short.hkl"], cwd=scan_folder)
    eager.use_compiled_kernels = False
    assert eager.switch_off.scan_plan() is None and eager.interpolation_cutoff() == expect


@pytest.mark.usefixtures("needs_fast")
def test_switch_off_scan_threads_and_slices(scan_folder):
    """Any thread count gives the first hit in C's order, however the rows are sliced."""
    args = SCAN_BASE + ["-hkl", "k_short.hkl", "-mosaic", "0.5", "-mosaic_dom", "3", "-seed", "1"]
    sim = torchbragg.Simulation.from_args(args, cwd=scan_folder)
    expect = sim.switch_off.scan_eager(0, 48)
    plan = sim.switch_off.scan_plan()
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            assert sim.switch_off.scan_compiled(plan, 0, 48) == expect, threads
            hit = plan.scan(0, 48, 0, 96, threads=threads)
            assert hit is not None and hit[0] == expect and hit[1]
    finally:
        torch.set_num_threads(old)

def test_wide_table_config_files(tmp_path):
    made = bench.prepare_files(bench.CONFIGS["interp128"], tmp_path)
    assert [p.name for p in made] == ["interp_wide6.hkl"]
    lines = made[0].read_text().splitlines()
    assert len(lines) == 13 ** 3 and lines[0].split()[:3] == ["-6", "-6", "-6"]
    assert bench.prepare_files(bench.CONFIGS["interp128"], tmp_path) == []  # already there
    assert "interp_wide60.hkl" in bench.CONFIGS["interp4096"]
    sim = torchbragg.Simulation.from_args(bench.CONFIGS["interp128"], cwd=tmp_path)
    assert sim.setup.interpolate and sim.switch_off.table_holds_every_neighbourhood()


@pytest.mark.usefixtures("needs_fast")
def test_bench_child_measures_the_fallback_map(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = bench.CONFIGS["interp128"]
    bench.prepare_files(args, tmp_path)
    import time

    spec = {"args": args, "dtype": "float32", "device": "cpu", "repeats": 1, "threads": None,
            "spawn_time": time.time()}
    assert bench._child(json.dumps(spec)) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(bench._MARK)][-1]
    r = json.loads(line[len(bench._MARK):])
    assert r["cutoff"] is None and r["cutoff_scan_s"] >= 0
    assert len(r["fallback_warm_s"]) == 5 and len(r["fallback_render_warm_s"]) == 5
    assert r["fallback_over_render"] == pytest.approx(r["fallback_warm_min_s"] / min(r["fallback_render_warm_s"]))
    assert r["fallback_over_render_pairs_median"] > 0
    doc = {"torchbragg": "0", "host": {"cpu": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2},
           "options": {"device": "cpu"},
           "configs": {"interp128": {"runs": {"float32": {"cli_cold": {"wall_s": 1.0, "returncode": 0},
                                                          "render": r}}}}}
    text = bench.format_table(doc)
    assert "fallback map: render_with_fallback" in text and "never switches off" in text
    assert "median of back-to-back pairs" in text


# --------------------------------------------------------------------------- fallback map memory
def test_fallback_maps_reuse_memory_only_when_nothing_refers_to_it():
    import gc

    simulation_module._fallback_buffers.clear()
    args = TAP_SMALL + ["-detpixels", "32"]
    sim = torchbragg.Simulation.from_args(args)
    _, fmap = sim.render_with_fallback()
    expect_counts, expect_reason = fmap.counts.clone(), fmap.reason.clone()
    ptrs = {fmap.counts.data_ptr(), fmap.reason.data_ptr()}
    del fmap
    gc.collect()
    _, again = sim.render_with_fallback()
    assert {again.counts.data_ptr(), again.reason.data_ptr()} == ptrs  # recycled
    assert torch.equal(again.counts, expect_counts) and torch.equal(again.reason, expect_reason)
    # while a map, a view of it or a numpy array on it is alive, its memory is never written again
    for keep in ("map", "view", "numpy"):
        _, held = sim.render_with_fallback()
        held.counts.fill_(99)
        handle = {"map": held, "view": held.counts[2:5], "numpy": held.counts.numpy()}[keep]
        del held
        gc.collect()
        for _ in range(2):
            _, other = sim.render_with_fallback()
            assert torch.equal(other.counts, expect_counts), keep
            del other
        values = handle.counts if keep == "map" else torch.as_tensor(handle)
        assert bool((values == 99).all()), keep
        del handle, values
        gc.collect()


def test_recycled_fallback_memory_is_cleared_outside_the_roi():
    import gc

    full = torchbragg.Simulation.from_args(TAP_SMALL)
    _, fmap = full.render_with_fallback()
    assert bool((fmap.counts > 0).all())
    del fmap
    gc.collect()
    roi = torchbragg.Simulation.from_args(TAP_SMALL + ["-roi", "3", "50", "5", "60"])
    _, part = roi.render_with_fallback()
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[5:61, 3:51] = True
    assert bool((part.counts[~inside] == 0).all()) and bool((part.reason[~inside] == 0).all())
    assert bool((part.counts[inside] > 0).all())


def test_bench_gradient_measurement(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHBRAGG_CACHE_DIR", str(tmp_path / "kernel-cache"))
    rc = cli.main(["bench", "--configs", "tap128", "--dtype", "float64", "--repeats", "2", "--gradient",
                   "--no-pytorch-path", "--no-first-ever", "--no-tap-process", "--quiet", "--json"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(text)
    gr = doc["configs"]["tap128"]["runs"]["float64"]["gradient"]
    assert gr["process"]["returncode"] == 0 and gr["components"] == 10
    assert gr["parameters"] == list(bench.GRADIENT_PARAMS)
    assert len(gr["forward_s"]) == 2 and gr["warm_min_s"] == pytest.approx(gr["forward_s"][1] + gr["backward_s"][1])
    assert gr["backward_kernel"] == "compiled CPU adjoint"
    table = bench.format_table(doc)
    assert "forward + backward of sum(image^2), 10 parameters" in table
    assert "backward by the compiled CPU adjoint" in table
