"""SMV images (and the PGM preview) as the C program writes them.

tests/data/file_formats/*_header.smv are the first 512 bytes (the header
block) of golden/cases/{cubic_hkl_mosflm,detector_rot_xds_os3}/img.smv.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from torchbragg.io.pgm import pgm_auto_scale, read_pgm, write_pgm
from torchbragg.io.smv import (
    SMVFormatError,
    c_beam_centers_mm,
    intfile_auto_scale,
    read_smv,
    read_smv_header,
    smv_header_fields,
    to_intimage,
    write_smv,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "file_formats"
GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
HEADERS = [DATA / "cubic_hkl_mosflm_header.smv", DATA / "detector_rot_xds_os3_header.smv"]

C_KEY_ORDER = [
    "HEADER_BYTES", "DIM", "BYTE_ORDER", "TYPE", "SIZE1", "SIZE2", "PIXEL_SIZE",
    "DISTANCE", "WAVELENGTH", "BEAM_CENTER_X", "BEAM_CENTER_Y", "ADXV_CENTER_X",
    "ADXV_CENTER_Y", "MOSFLM_CENTER_X", "MOSFLM_CENTER_Y", "DENZO_X_BEAM",
    "DENZO_Y_BEAM", "DIALS_ORIGIN", "XDS_ORGX", "XDS_ORGY", "CLOSE_DISTANCE", "PHI",
    "OSC_START", "OSC_RANGE", "TWOTHETA", "DETECTOR_SN", "BEAMLINE",
]


def golden_smv_files():
    if not GOLDEN.is_dir():
        return []
    return [
        pytest.param(p, id=f"{p.parent.name}/{p.name}")
        for p in sorted((GOLDEN / "cases").glob("*/*.smv"))
    ]


def rebuild_fields(h):
    """Feed parsed header values back through the builder."""
    f = lambda k: float(h[k])  # noqa: E731
    return smv_header_fields(
        pixel_size_mm=f("PIXEL_SIZE"),
        distance_mm=f("DISTANCE"),
        wavelength_A=f("WAVELENGTH"),
        beam_center_x_mm=f("BEAM_CENTER_X"),
        beam_center_y_mm=f("BEAM_CENTER_Y"),
        adxv_center_mm=(f("ADXV_CENTER_X"), f("ADXV_CENTER_Y")),
        mosflm_center_mm=(f("MOSFLM_CENTER_X"), f("MOSFLM_CENTER_Y")),
        denzo_beam_mm=(f("DENZO_X_BEAM"), f("DENZO_Y_BEAM")),
        dials_origin_mm=[float(v) for v in h["DIALS_ORIGIN"].split(",")],
        xds_org_px=(f("XDS_ORGX"), f("XDS_ORGY")),
        close_distance_mm=f("CLOSE_DISTANCE"),
        phi_deg=f("PHI"),
        osc_range_deg=f("OSC_RANGE"),
        twotheta_deg=f("TWOTHETA"),
    )


# --- header ------------------------------------------------------------------

@pytest.mark.parametrize("path", HEADERS, ids=lambda p: p.name)
def test_c_header_keys_order_and_padding(path):
    raw = path.read_bytes()
    assert len(raw) == 512
    h = read_smv_header(path)
    assert list(h) == C_KEY_ORDER
    assert h["HEADER_BYTES"] == "512" and h["TYPE"] == "unsigned_short"
    assert h["BYTE_ORDER"] == "little_endian"
    assert h["DETECTOR_SN"] == "000" and h["BEAMLINE"] == "fake"
    end = raw.index(b"}")
    assert raw[end + 1 : end + 2] == b"\f"
    assert raw[end + 2 :] == b" " * (510 - end)
    assert b"\nDIALS_ORIGIN=" in raw and re.search(rb"DIALS_ORIGIN=[^;\n]*\n", raw)


@pytest.mark.parametrize("path", HEADERS, ids=lambda p: p.name)
def test_builder_reproduces_c_header_exactly(path, tmp_path):
    h = read_smv_header(path)
    image = np.zeros((int(h["SIZE2"]), int(h["SIZE1"])), np.uint16)
    out = tmp_path / "x.smv"
    write_smv(out, image, rebuild_fields(h))
    assert out.read_bytes()[:512] == path.read_bytes()


def test_mosflm_header_values():
    h = read_smv_header(HEADERS[0])  # -lambda 6.2 -distance 100 -detpixels 256 -pixel 0.4
    assert h["SIZE1"] == h["SIZE2"] == "256"
    assert h["PIXEL_SIZE"] == "0.4" and h["WAVELENGTH"] == "6.2"
    assert h["DIALS_ORIGIN"] == "-51.6,51.6,-100"
    # convention keys derive from Fbeam = Sbeam = 51.6 mm on a 102.4 mm detector
    derived = c_beam_centers_mm(fbeam_mm=51.6, sbeam_mm=51.6, detsize_s_mm=102.4, pixel_size_mm=0.4)
    fields = rebuild_fields(h)
    fields2 = smv_header_fields(
        pixel_size_mm=0.4, distance_mm=100, wavelength_A=6.2, beam_center_x_mm=51.4,
        beam_center_y_mm=51.4, dials_origin_mm=(-51.6, 51.6, -100), xds_org_px=(129.5, 129.5),
        close_distance_mm=100, **derived,
    )
    assert fields2 == fields


def test_header_only_file_is_truncated():
    with pytest.raises(SMVFormatError, match=r"truncated SMV data: 256x256 unsigned_short") as info:
        read_smv(HEADERS[0])
    assert str(HEADERS[0]) in str(info.value)


# --- golden images -------------------------------------------------------------

@pytest.mark.parametrize("path", golden_smv_files())
def test_golden_smv_rewrites_byte_identical(path, tmp_path):
    header, image = read_smv(path)
    assert image.dtype == np.uint16 and image.shape == (256, 256)
    out = tmp_path / "copy.smv"
    write_smv(out, image, rebuild_fields(header))
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", [p for p in golden_smv_files() if p.values[0].name == "img.smv"])
def test_intfile_pixels_match_c(path):
    header, image = read_smv(path)
    floats = np.fromfile(path.parent / "img.f32", "<f4").reshape(image.shape)
    pixels, scale = to_intimage(floats)
    assert np.array_equal(pixels, image)
    log = (path.parent / "log.txt").read_text()
    assert f"intfile_scale = {scale:g}\n" in log
    assert scale == intfile_auto_scale(floats)


def test_golden_has_smv_files():
    if not GOLDEN.is_dir():
        pytest.skip("golden data (/work/shared/golden) not available")
    assert len(golden_smv_files()) >= 4


def test_fabio_reads_what_we_write(tmp_path):
    fabio = pytest.importorskip("fabio")
    h = read_smv_header(HEADERS[1])
    image = (np.arange(256 * 256, dtype=np.uint32) % 65536).astype(np.uint16).reshape(256, 256)
    out = tmp_path / "fabio.img"
    write_smv(out, image, rebuild_fields(h))
    img = fabio.open(str(out))
    assert np.array_equal(np.asarray(img.data), image)
    assert img.header["DIALS_ORIGIN"] == "90.5355,-51.3693,19.2899"


# --- conversion details ----------------------------------------------------------

def test_intimage_rounds_through_single_precision():
    # t + 0.5 = 1234.9999999 rounds to 1235.0 in float32 before floorf
    pixels, scale = to_intimage(np.ones((1, 1), np.float32), scale=1234.4999999, adc_offset=0.0)
    assert pixels[0, 0] == 1235
    assert np.floor(1234.4999999 + 0.5) == 1234  # what a double floor would give


def test_intimage_clips_and_offsets():
    img = np.array([[-100.0, 0.0, 1.0, 1e9, np.nan]], np.float32)
    pixels, scale = to_intimage(img, scale=2.0, adc_offset=40.0)
    assert pixels.tolist() == [[0, 40, 42, 65535, 0]]
    _, auto = to_intimage(np.array([[0.0, 2.0]], np.float32))
    assert auto == 27500.0
    _, flat = to_intimage(np.zeros((2, 2), np.float32))
    assert flat == 1.0


# --- writer / reader ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.float32])
@pytest.mark.parametrize("order", ["little_endian", "big_endian"])
def test_round_trip_types_and_byte_orders(tmp_path, dtype, order):
    image = (np.arange(12).reshape(3, 4) * 7).astype(dtype)
    out = tmp_path / "rt.smv"
    write_smv(out, image, {"PIXEL_SIZE": 0.1, "PHI": 0.0}, byte_order=order)
    header, back = read_smv(out)
    assert header["BYTE_ORDER"] == order
    assert header["SIZE1"] == "4" and header["SIZE2"] == "3"
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, image)
    assert out.stat().st_size == 512 + image.nbytes


def test_long_header_grows_in_512_byte_blocks(tmp_path):
    fields = {f"KEY_{i:03d}": "x" * 20 for i in range(40)}
    out = tmp_path / "long.smv"
    image = np.ones((2, 2), np.uint16)
    write_smv(out, image, fields)
    header, back = read_smv(out)
    assert header["HEADER_BYTES"] == "1536"
    assert out.stat().st_size == 1536 + 8
    assert header["KEY_039"] == "x" * 20 and np.array_equal(back, image)


def test_structural_keys_must_agree(tmp_path):
    image = np.zeros((2, 3), np.uint16)
    write_smv(tmp_path / "ok.smv", image, {"SIZE1": 3, "SIZE2": "2", "HEADER_BYTES": 512})
    with pytest.raises(ValueError, match="SIZE1"):
        write_smv(tmp_path / "bad.smv", image, {"SIZE1": 4})
    with pytest.raises(ValueError, match="may not contain"):
        write_smv(tmp_path / "bad.smv", image, {"NOTE": "a;b"})
    with pytest.raises(TypeError, match="to_intimage"):
        write_smv(tmp_path / "bad.smv", image.astype(np.float64), {})
    with pytest.raises(ValueError, match="2-D"):
        write_smv(tmp_path / "bad.smv", np.zeros(4, np.uint16), {})


def _smv(tmp_path, header_text, payload=b"", name="bad.smv"):
    raw = header_text.encode()
    p = tmp_path / name
    p.write_bytes(raw + b" " * (512 - len(raw)) + payload)
    return p


@pytest.mark.parametrize(
    "text, payload, message",
    [
        ("not an smv", b"", "does not start with"),
        ("{\nDIM=2;\n}", b"", "no HEADER_BYTES"),
        ("{\nHEADER_BYTES=512;\nSIZE2=2;\nTYPE=unsigned_short;\nBYTE_ORDER=little_endian;\n}", b"", "no SIZE1"),
        ("{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n"
         "TYPE=unsigned_short;\nBYTE_ORDER=middle;\n}", b"\0" * 8, "BYTE_ORDER='middle'"),
        ("{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n"
         "TYPE=complex;\nBYTE_ORDER=little_endian;\n}", b"\0" * 8, "unsupported SMV TYPE='complex'"),
        ("{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n"
         "TYPE=unsigned_short;\nBYTE_ORDER=little_endian;\n}", b"\0" * 6, "need 8 bytes"),
        ("{\nHEADER_BYTES=512;\nSIZE1=x;\nSIZE2=2;\n}", b"", "SIZE1='x' is not an integer"),
        ("{\nHEADER_BYTES=512;\nDIM=3;\n}", b"", "DIM='3'"),
        ("{\nHEADER_BYTES=1024;\n}", b"", "shorter than its HEADER_BYTES=1024"),
        ("{\nHEADER_BYTES=512;\nSIZE1=2;", b"", "no closing"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, payload, message):
    p = _smv(tmp_path, text, payload)
    with pytest.raises(SMVFormatError, match=re.escape(message)) as info:
        read_smv(p)
    assert str(info.value).startswith(str(p))


def test_repeated_key_keeps_the_last_value(tmp_path):
    p = _smv(tmp_path, "{\nHEADER_BYTES=512;\nPHI=1;\nPHI=2;\n}")
    assert read_smv_header(p)["PHI"] == "2"


def test_missing_type_defaults_to_unsigned_short(tmp_path):
    p = _smv(tmp_path, "{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=1;\nBYTE_ORDER=big_endian;\n}", b"\x01\x02\x00\x03")
    _, image = read_smv(p)
    assert image.tolist() == [[258, 3]]


# --- PGM preview ---------------------------------------------------------------------

def test_pgm_layout_and_scaling(tmp_path):
    img = np.array([[0.0, 1.0, 2.9], [200.0, -1.0, 0.5]], np.float32)
    out = tmp_path / "p.pgm"
    assert write_pgm(out, img, scale=2.0) == 2.0
    data = out.read_bytes()
    assert data.startswith(b"P5\n3 2\n# pixels scaled by 2\n255\n")
    assert list(data[-6:]) == [0, 2, 5, 255, 0, 1]
    assert read_pgm(out).tolist() == [[0, 2, 5], [255, 0, 1]]


def test_pgm_auto_scale_is_250_over_5_rmsd(tmp_path):
    img = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32)
    rmsd = np.std(img.astype(np.float64), ddof=1)
    assert pgm_auto_scale(img) == pytest.approx(250.0 / (5.0 * rmsd))
    used = write_pgm(tmp_path / "a.pgm", img)
    assert used == pytest.approx(250.0 / (5.0 * rmsd))
    flat = np.full((2, 2), 4.0, np.float32)
    assert pgm_auto_scale(flat) == 55000.0 / 4.0
    assert pgm_auto_scale(flat, intfile_scale=3.0) == 3.0

