"""Image comparison, image loading and the ``torchbragg compare`` command."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from torchbragg.cli.compare import main_compare
from torchbragg.compare import compare_images, format_comparison
from torchbragg.io.images import load_image, load_image_info
from torchbragg.io.smv import write_smv

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"


def golden():
    if not GOLDEN.is_dir():
        pytest.skip("golden data (/work/shared/golden) not available")
    return GOLDEN


def raw(tmp_path, array, name="img.f32"):
    p = tmp_path / name
    np.asarray(array, "<f4").tofile(p)
    return p


# --- statistics ---------------------------------------------------------------

def test_identical_images():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    cmp = compare_images(img, img)
    assert cmp.shape == (3, 4)
    assert cmp.correlation == pytest.approx(1.0)
    assert cmp.rmse == 0.0 and cmp.max_abs_diff == 0.0 and cmp.max_rel_diff == 0.0
    assert cmp.sum_ratio == 1.0 and cmp.worst == []
    assert cmp.passes()


def test_known_differences():
    ref = np.zeros((4, 5))
    ref[1, 2] = 10.0
    ref[3, 4] = 4.0
    out = ref.copy()
    out[1, 2] = 9.0   # diff -1
    out[0, 0] = 3.0   # diff +3
    out[3, 4] = 4.5   # diff +0.5
    cmp = compare_images(ref, out)
    assert cmp.worst == [(0, 0, 0.0, 3.0, 3.0), (1, 2, 10.0, 9.0, -1.0), (3, 4, 4.0, 4.5, 0.5)]
    assert cmp.sum_ref == 14.0 and cmp.sum_out == 16.5
    assert cmp.sum_ratio == pytest.approx(16.5 / 14.0)
    assert cmp.max_abs_diff == 3.0 and cmp.max_rel_diff == pytest.approx(0.3)
    assert cmp.max_ref == 10.0 and cmp.max_out == 9.0
    assert cmp.rmse == pytest.approx(math.sqrt((9 + 1 + 0.25) / 20))
    assert cmp.correlation == pytest.approx(np.corrcoef(ref.ravel(), out.ravel())[0, 1])
    assert not cmp.passes()
    assert cmp.criteria() == {"correlation": False, "sum_ratio": False, "max_pixel": False}


def test_top_ten_only():
    ref = np.zeros((10, 10))
    out = np.arange(100.0).reshape(10, 10)
    cmp = compare_images(ref, out)
    assert len(cmp.worst) == 10
    assert cmp.worst[0][:2] == (9, 9) and cmp.worst[-1][:2] == (9, 0)


def test_to_dict_is_strict_json():
    ref = np.zeros((2, 2))
    cmp = compare_images(ref, ref)  # flat: correlation undefined, sum ratio 0/0
    d = cmp.to_dict()
    assert d["correlation"] is None and d["sum_ratio"] is None
    json.dumps(d, allow_nan=False)
    assert d["passes"] is False


def test_nan_pixels_are_counted():
    ref = np.ones((2, 2))
    out = ref.copy()
    out[1, 1] = np.nan
    cmp = compare_images(ref, out)
    assert cmp.nonfinite_out == 1 and cmp.nonfinite_ref == 0
    assert cmp.worst[0][:2] == (1, 1)
    assert "non-finite" in format_comparison(cmp)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"reference \(2, 2\), output \(2, 3\)"):
        compare_images(np.zeros((2, 2)), np.zeros((2, 3)))


def test_report_text():
    ref = np.ones((3, 3))
    out = ref * 1.0005
    text = format_comparison(compare_images(ref, out), "ref.f32", "out.f32")
    assert text.splitlines()[0] == "compare out.f32 against ref.f32: 3x3 (slow x fast)"
    assert "sum_ratio" not in text and "ratio 1.00050000" in text
    assert "overall       FAIL" in text  # flat images: correlation undefined


# --- loading ---------------------------------------------------------------------

def test_load_raw_with_shape_sidecar_and_guess(tmp_path):
    data = np.arange(24, dtype=np.float32)
    p = raw(tmp_path, data)
    assert load_image(p, (4, 6)).shape == (4, 6)
    (tmp_path / "img.f32.json").write_text(json.dumps({"shape": [2, 12]}))
    img, note = load_image_info(p)
    assert img.shape == (2, 12) and note == "sidecar img.f32.json"
    assert np.array_equal(img.ravel(), data)
    sq = raw(tmp_path, np.arange(16), "sq.bin")
    img, note = load_image_info(sq)
    assert img.shape == (4, 4) and note.startswith("guessed square 4x4")


def test_load_raw_ambiguous_names_file_and_size(tmp_path):
    p = raw(tmp_path, np.arange(24), "odd.raw")
    with pytest.raises(ValueError, match=r"odd.raw: cannot tell the shape of 24 float32 values \(96 bytes\)"):
        load_image(p)


@pytest.mark.parametrize(
    "content, name, shape, message",
    [
        (b"\0" * 10, "x.f32", None, "10 bytes is not a whole number of float32 values"),
        (b"\0" * 16, "x.f32", (3, 3), "4 float32 values (16 bytes) do not fit shape 3x3"),
        (b"\0" * 16, "x.tif", None, "unknown image type '.tif'"),
        (b"", "x.f32", None, "empty file"),
    ],
)
def test_load_errors(tmp_path, content, name, shape, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_image(p, shape)
    assert message in str(info.value) and name in str(info.value)


def test_bad_sidecar(tmp_path):
    p = raw(tmp_path, np.arange(4))
    (tmp_path / "img.f32.json").write_text('{"shape": [2]}')
    with pytest.raises(ValueError, match="img.f32.json"):
        load_image(p)


def test_load_smv(tmp_path):
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    p = tmp_path / "a.img"
    write_smv(p, image, {})
    img, note = load_image_info(p)
    assert note == "SMV header" and np.array_equal(img, image)
    with pytest.raises(ValueError, match="not 3x2"):
        load_image(p, (3, 2))


# --- command line -------------------------------------------------------------------

def test_cli_report_and_json(tmp_path, capsys):
    ref = raw(tmp_path, np.arange(1, 13, dtype=np.float32), "ref.bin")
    out = raw(tmp_path, np.arange(1, 13, dtype=np.float32) * 1.00001, "out.bin")
    assert main_compare([str(ref), str(out), "--shape", "3", "4"]) == 0
    text = capsys.readouterr().out
    assert "3x4 (slow x fast)" in text and "overall       PASS" in text
    assert main_compare([str(ref), str(out), "--shape", "3", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shape"] == [3, 4] and data["passes"] is True
    assert data["out"] == {"path": str(out), "shape_from": "--shape"}


def test_cli_uses_reference_shape_for_raw_output(tmp_path, capsys):
    ref = tmp_path / "ref.smv"
    write_smv(ref, np.arange(6, dtype=np.uint16).reshape(2, 3), {})
    out = raw(tmp_path, np.arange(6), "out.f32")
    assert main_compare([str(ref), str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"]["shape_from"] == "reference image's shape"
    assert data["max_abs_diff"] == 0.0


def test_cli_says_when_it_guessed(tmp_path, capsys):
    a = raw(tmp_path, np.arange(4), "a.f32")
    assert main_compare([str(a), str(a)]) == 0
    assert "note: " + str(a) + ": guessed square 2x2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/missing.f32", "{d}/a.f32"], "missing.f32: No such file or directory"),
        (["{d}/a.f32", "{d}/b.f32"], "do not fit the reference image's 2x2"),
        (["{d}/a.f32"], "the following arguments are required: out"),
        (["{d}/a.f32", "{d}/a.f32", "--shape", "2"], "--shape"),
        (["{d}/a.f32", "{d}/a.f32", "--shape", "0", "4"], "--shape needs two positive integers"),
        (["{d}/a.f32", "{d}/junk.smv"], "not an SMV file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    raw(tmp_path, np.arange(4), "a.f32")
    raw(tmp_path, np.arange(6), "b.f32")
    (tmp_path / "junk.smv").write_bytes(b"hello" * 200)
    code = main_compare([a.format(d=tmp_path) for a in args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchbragg compare: error: ")
    assert message in lines[0]


def test_cli_help(capsys):
    assert main_compare(["--help"]) == 0
    assert "torchbragg compare" in capsys.readouterr().out


# --- golden ----------------------------------------------------------------------

def test_golden_self_and_stale_comparison(capsys):
    g = golden()
    clean = g / "cases" / "stale_fdump_clean" / "img.f32"
    stale = g / "cases" / "stale_fdump" / "img.f32"
    a = load_image(clean, (512, 512))
    assert compare_images(a, a).passes()
    cmp = compare_images(a, load_image(stale, (512, 512)))
    assert not cmp.passes()
    # the stale run's centre pixel is 100x dimmer (F000 10 instead of 100)
    worst = {(s, f): (r, o) for s, f, r, o, _ in cmp.worst}
    r, o = worst[(256, 256)]
    assert r / o == pytest.approx(100.0, rel=1e-4)
    assert main_compare([str(clean), str(stale), "--shape", "512", "512"]) == 0
    assert "overall       FAIL" in capsys.readouterr().out


def test_golden_smv_against_float_image():
    g = golden()
    case = g / "cases" / "cubic_hkl_mosflm"
    floats = load_image(case / "img.f32", (256, 256))
    ints = load_image(case / "img.smv")
    cmp = compare_images(floats, ints)
    assert cmp.correlation > 0.9999  # the intfile is a linear rescale plus offset


def test_smv_counts_converted_to_photons(tmp_path, capsys):
    import shutil

    from torchbragg.io.images import load_image_photons

    case = Path(__file__).resolve().parents[1] / "data" / "golden_small" / "cases" / "cubic_hkl_mosflm"
    ref, info = load_image_photons(case / "img.smv")
    assert info["converted"] and info["adc"] == 40.0 and info["warning"] is None
    flt = np.fromfile(case / "img.f32", "<f4").astype(np.float64)
    assert abs(ref.sum() / flt.sum() - 1) < 1e-3
    assert main_compare([str(case / "img.smv"), str(case / "img.f32"), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["sum_ratio"] - 1) < 1e-3
    lone = tmp_path / "img.smv"  # no log beside it: an explicit warning, counts kept
    shutil.copy(case / "img.smv", lone)
    _, info = load_image_photons(lone)
    assert not info["converted"] and str(lone) in info["warning"]
    assert main_compare([str(lone), str(case / "img.f32")]) == 0
    assert "NOT converted" in capsys.readouterr().err
    scaled, info = load_image_photons(lone, scale=25.968)
    assert info["converted"] and abs(scaled.sum() / flt.sum() - 1) < 1e-3
