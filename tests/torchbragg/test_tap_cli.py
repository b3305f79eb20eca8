"""The bragg-tap command, evidence bundles and the HKL audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from torchbragg.cli import tap as tap_cli
from torchbragg.report_bundle import is_bundle, new_bundle
from torchbragg.tap_audit import nearest_neighbour_rule, write_audit

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO.parent / "shared" / "golden"
SCHEMA = json.loads((REPO / "specs" / "tap_schema.json").read_text())
SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5", "-default_F", "100", "-lambda", "0.5",
         "-distance", "500", "-pixel", "0.8", "-detpixels", "256", "-oversample", "2"]


def run(argv, capsys):
    code = tap_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_output_and_default_configuration_line(capsys):
    code, out, err = run(["--pixel", "128", "128", "--"] + SMALL, capsys)
    assert code == 0
    assert "pixel (slow=128, fast=128)" in out and "default_F:no_table" in out
    code, out, err = run(["--pixel", "2048", "2048", "--taps", "hkl_subpixel"], capsys)
    assert code == 0 and "using the 4096² tap configuration" in err
    assert "4 of 4 evaluations used default_F: no HKL table loaded" in out


def test_json_files_carry_pixel_tap_and_tag_and_never_overwrite(tmp_path, capsys):
    argv = ["--pixel", "10", "20", "--pixel", "30", "40", "--taps", "hkl_subpixel,intensity", "--json",
            "--out-dir", str(tmp_path), "--tag", "edge", "--oversample", "3", "--"] + SMALL
    assert run(argv, capsys)[0] == 0
    assert run(argv, capsys)[0] == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([
        "tap_hkl_subpixel_s10_f20_edge.json", "tap_hkl_subpixel_s10_f20_edge-2.json",
        "tap_intensity_s10_f20_edge.json", "tap_intensity_s10_f20_edge-2.json",
        "tap_hkl_subpixel_s30_f40_edge.json", "tap_hkl_subpixel_s30_f40_edge-2.json",
        "tap_intensity_s30_f40_edge.json", "tap_intensity_s30_f40_edge-2.json"])
    doc = json.loads((tmp_path / "tap_hkl_subpixel_s10_f20_edge.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["oversample"] == 3 and len(doc["values"]["subpixels"]) == 9
    assert doc["config"]["args"][-2:] == ["-oversample", "3"]


@pytest.mark.parametrize("argv,message", [
    (["--pixel", "256", "0"], "outside the 256x256 detector"),
    (["--pixel", "0", "0", "--taps", "hkl_subpixel,bogus"], "unknown tap 'bogus'"),
    (["--pixel", "0", "0", "--out-dir", "/proc/no/such/folder"], "cannot create folder"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    before = set(tmp_path.rglob("*"))
    if "--out-dir" not in argv:
        argv = argv + ["--out-dir", str(tmp_path / "o")]
    code, out, err = run(argv + ["--json", "--"] + SMALL, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("bragg-tap: error")]
    assert len(lines) == 1 and message in lines[0]
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "o"}
    assert not list(tmp_path.rglob("*.json"))


def test_unknown_nanobragg_flag_is_an_error(capsys):
    code, out, err = run(["--pixel", "0", "0", "--", "-cell", "100", "100", "100", "90", "90", "90",
                          "-default_F", "1", "-tophat_xtal"], capsys)
    assert code == 2 and "unknown flag -tophat_xtal; did you mean -tophat_spots?" in err


def test_bundle_commands_and_audit_against_c(tmp_path, capsys):
    c_taps = GOLDEN / "taps" / "c_subpixel_taps.json"
    if not c_taps.exists():
        pytest.skip("../shared/golden is absent")
    args = json.loads(c_taps.read_text())["configs"]["tap_config4096"]["args"]
    parent = tmp_path / "reports" / "topic" / "phase"
    code, out, err = run(["--pixel", "2048", "2048", "--pixel", "0", "0", "--bundle", str(parent), "--tag", "t",
                          "--"] + args, capsys)
    assert code == 0
    (bundle,) = list(parent.iterdir())
    assert is_bundle(bundle)
    commands = (bundle / "commands.txt").read_text()
    assert "bragg-tap --pixel 2048 2048 --pixel 0 0" in commands and "torch" in commands
    # a second run into the same bundle appends, a run into the parent makes a fresh one
    assert run(["--pixel", "1", "1", "--bundle", str(bundle), "--"] + args, capsys)[0] == 0
    assert (bundle / "commands.txt").read_text().count("bragg-tap --pixel") == 2
    assert len(list((bundle / "py_taps").glob("*.json"))) == 3
    audit = write_audit(bundle, c_taps)
    text = audit.read_text()
    assert audit.name == "tap5_hkl_audit.md"
    assert nearest_neighbour_rule()[0].splitlines()[0] in text
    assert text.count("**No mismatch**") == 2  # the two pixels that C printed
    assert "Pixel (2048, 2048) uses default_F = 100 in 4 of 4 evaluations" in text
    assert "no C rows for these arguments and this pixel" in text  # pixel (1,1) has none
    again = write_audit(bundle, c_taps)
    assert again.name == "tap5_hkl_audit-2.md" and audit.read_text() == text


def test_audit_names_mismatches(tmp_path, capsys):
    c_taps = GOLDEN / "taps" / "c_subpixel_taps.json"
    if not c_taps.exists():
        pytest.skip("../shared/golden is absent")
    data = json.loads(c_taps.read_text())
    row = data["configs"]["tap_config4096"]["pixels"][0]["rows"][1]
    row["h0"] += 1
    row["F_cell"] = 12.5
    data["configs"]["tap_config4096"]["pixels"][0]["pixel_value"] *= 1.01
    tampered = tmp_path / "c.json"
    tampered.write_text(json.dumps(data))
    args = data["configs"]["tap_config4096"]["args"]
    bundle = new_bundle(tmp_path / "b")
    assert run(["--pixel", "2048", "2048", "--bundle", str(bundle), "--"] + args, capsys)[0] == 0
    text = write_audit(bundle, tampered).read_text()
    assert "3 mismatch(es)" in text
    assert "subS 0 subF 1 source 0 phi 0 mosaic 0: (h0,k0,l0) engine (0, 0, 0) C (1, 0, 0)" in text
    assert "F_cell engine 100 C 12.5" in text and "final intensity engine" in text


def test_bragg_tap_console_script_runs_as_a_process(tmp_path):
    exe = Path(sys.executable).parent / "bragg-tap"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torchbragg.cli.tap"]
    p = subprocess.run(cmd + ["--pixel", "3", "4", "--json", "--out-dir", str(tmp_path), "--"] + SMALL,
                       capture_output=True, text=True, timeout=120, env={**os.environ})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "tap_hkl_subpixel_s3_f4.json").exists()
