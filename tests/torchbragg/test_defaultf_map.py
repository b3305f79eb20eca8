"""The default_F map measured from outside agrees with the engine's fallback map."""

import json
import sys

import numpy as np
import pytest

from torchbragg.cli.defaultf_map import main
from torchbragg.defaultf_map import compare_fallback, fallback_labels, renderer_args

HKL = "\n".join(f"{h} {k} {l} 10" for h in range(-1, 2) for k in range(-1, 2) for l in range(-1, 2)
                if (h + k + l) % 2 == 0) + "\n"
ARGS = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", "t.hkl", "-default_F", "5", "-N", "3",
        "-lambda", "1.0", "-distance", "100", "-detpixels", "48", "-pixel", "0.4", "-nointerpolate",
        "-mosaic", "0.5", "-mosaic_dom", "2", "-phi", "0", "-osc", "0.5", "-phisteps", "2", "-mosaic_seed", "7",
        "-floatfile", "user.bin"]


def test_compare_fallback_masks_and_reasons():
    cur = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    ref = np.array([[1, 1], [0, 2]], dtype=np.uint8)
    c = compare_fallback(cur, ref)
    assert c == {"both": 2, "only_current": 1, "only_reference": 1, "neither": 0, "reason_changed": 1,
                 "shape": [2, 2]}
    assert fallback_labels(cur, ref).tolist() == [[3, 1], [2, 4]]
    assert compare_fallback(cur > 0, ref > 0)["reason_changed"] == 0
    with pytest.raises(ValueError):
        compare_fallback(cur, ref[:1])


def test_renderer_args_strip_outputs(tmp_path):
    out = renderer_args(ARGS, 7.0, "f.bin", cwd=str(tmp_path))
    assert "user.bin" not in out and out.count("-default_F") == 1
    assert out[out.index("-hkl") + 1] == str(tmp_path / "t.hkl")
    assert out[-6:] == ["-default_F", "7", "-floatfile", "f.bin", "-nonoise", "-nopgm"]


def test_measured_map_agrees_with_engine(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.hkl").write_text(HKL)
    (tmp_path / "Fdump.bin").write_bytes(b"stale")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res"
    rc = main(["--renderer", f"{sys.executable} -m torchbragg", "--out", str(out), "--"] + ARGS)
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    mask = np.fromfile(out / summary["mask_file"], dtype=np.uint8).reshape(summary["shape"])
    assert summary["counts"]["changed"] == int(mask.sum()) > 0
    assert summary["engine"]["only_measured"] == summary["engine"]["only_engine"] == 0
    assert summary["default_F"] == [5.0, 5000.0]
    assert not (tmp_path / "user.bin").exists()
    assert main(["--renderer", sys.executable, "--out", str(out), "--"] + ARGS) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "5", "-N", "3", "-lambda", "1.0",
         "-distance", "100", "-detpixels", "16", "-pixel", "0.4"]


def _fake_renderer(tmp_path, body: str):
    """A stand-in renderer: a Python script that sees the nanoBragg flags in ``args``."""
    prog = tmp_path / "fake_renderer"
    prog.write_text(f"#!{sys.executable}\nimport sys, time\nimport numpy as np\nargs = sys.argv[1:]\n"
                    f"out = args[args.index('-floatfile') + 1]\n{body}\n")
    prog.chmod(0o755)
    return str(prog)


def test_dispatched_by_the_torchbragg_command(tmp_path):
    import subprocess

    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "torchbragg", "defaultf-map", "--renderer",
                           f"{sys.executable} -m torchbragg", "--out", str(out), "--"] + SMALL,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    # no HKL table: every pixel used default_F, measured and exact
    assert summary["counts"] == {"changed": 256, "total": 256}
    assert summary["engine"]["fallback_pixels"] == 256 and summary["engine"]["agree"] == 256
    assert "changed pixels: 256 of 256" in proc.stdout


@pytest.mark.parametrize("body, message", [
    ("np.zeros(15 * 16, '<f4').tofile(out)", "wrote 240 floats; the arguments give 16x16"),
    ("print('cannot read the HKL file', file=sys.stderr); sys.exit(3)", "exit 3: cannot read the HKL file"),
    ("pass", "wrote no float image"),
    ("time.sleep(30)", "ran past --timeout 1 s"),
])
def test_a_misbehaving_renderer_is_a_one_line_error(tmp_path, capsys, body, message):
    prog = _fake_renderer(tmp_path, body)
    out = tmp_path / "res"
    rc = main(["--renderer", prog, "--out", str(out), "--timeout", "1", "--"] + SMALL)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") - err.count("defaultf-map: run") - err.count("defaultf-map: engine") == 1
    assert "Traceback" not in err and not out.exists()


def test_options_are_checked_before_any_run(tmp_path, capsys):
    prog = _fake_renderer(tmp_path, "open('ran', 'w').write('x')")
    assert main(["--renderer", prog, "--timeout", "nan", "--"] + SMALL) == 2
    assert "--timeout nan" in capsys.readouterr().err
    assert main(["--renderer", prog, "--list", "-1", "--"] + SMALL) == 2
    assert "--list -1" in capsys.readouterr().err
    assert main(["--renderer", str(tmp_path / "missing"), "--"] + SMALL) == 2
    assert "not an executable program" in capsys.readouterr().err
    assert main(["--renderer", prog, "--"]) == 2
    assert "no nanoBragg arguments" in capsys.readouterr().err
    assert not list(tmp_path.rglob("ran"))


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --renderer"),
    (["--renderer", "x", "--bogus", "--"] + SMALL, "unrecognized arguments: --bogus"),
    (["--renderer", "x", "--list", "many", "--"] + SMALL, "argument --list: invalid int value: 'many'"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"torchbragg defaultf-map: error: {message}"
