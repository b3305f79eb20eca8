"""The C program's Fdump.bin cache: layout, reading, byte-identical writing.

tests/data/file_formats/f_hkl_m2p2_defaultF50.Fdump.bin is the Fdump.bin the C
program wrote in golden/cases/hkl_partial_defaultF (``-hkl f_hkl_m2p2.hkl
-default_F 50``).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from torchbragg.io.hkl_table import (
    HKLFormatError,
    HKLWarning,
    fdump_bytes,
    read_fdump,
    read_hkl,
    write_fdump,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "file_formats"
GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
FDUMP = DATA / "f_hkl_m2p2_defaultF50.Fdump.bin"


def golden_fdump_cases():
    if not GOLDEN.is_dir():
        return []
    cases = json.loads((GOLDEN / "cases.json").read_text())
    out = []
    for name, case in cases.items():
        folder = GOLDEN / "cases" / name
        if not (folder / "Fdump.bin").exists():
            continue
        args = case.get("first_run_args", case["args"])  # stale_fdump: written by the first run
        hkl = args[args.index("-hkl") + 1]
        default_F = float(args[args.index("-default_F") + 1]) if "-default_F" in args else 0.0
        out.append(pytest.param(folder, hkl, default_F, id=name))
    return out


def test_layout_of_a_c_written_file():
    data = FDUMP.read_bytes()
    header = b"-2 2 -2 2 -2 2\n\f"
    assert data.startswith(header)
    assert len(data) == len(header) + 8 * 6 * 6 * 6  # one padding cell per axis
    box = np.frombuffer(data, "<f8", offset=len(header)).reshape(6, 6, 6)
    assert box[5].max() == 0 and box[:, 5].max() == 0 and box[:, :, 5].max() == 0
    assert box[2, 2, 2] == 10.0  # F(000)


def test_read_equals_hkl_and_writes_back_identically(tmp_path):
    dump = read_fdump(FDUMP, default_F=50)
    hkl = read_hkl(DATA / "f_hkl_m2p2.hkl", 50)
    assert dump.kind == "fdump"
    assert dump.same_values(hkl)
    assert np.array_equal(dump.listed, hkl.listed)
    assert dump.count == 125
    out = tmp_path / "Fdump.bin"
    write_fdump(out, dump)
    assert out.read_bytes() == FDUMP.read_bytes()
    assert fdump_bytes(hkl) == FDUMP.read_bytes()


def test_describe_fdump():
    dump = read_fdump(FDUMP, default_F=50)
    assert dump.describe() == (
        "Fdump table f_hkl_m2p2_defaultF50.Fdump.bin: 125 cells differ from default_F, "
        "h -2..2, k -2..2, l -2..2, default_F 50"
    )


@pytest.mark.parametrize("folder, hkl, default_F", golden_fdump_cases())
def test_every_golden_fdump(folder, hkl, default_F, tmp_path):
    from_hkl = read_hkl(folder / hkl, default_F)
    from_dump = read_fdump(folder / "Fdump.bin", default_F)
    assert from_dump.same_values(from_hkl)
    # listed for an Fdump = cells that differ from default_F
    assert np.array_equal(from_dump.listed, from_hkl.values != default_F)
    out = tmp_path / "Fdump.bin"
    write_fdump(out, from_hkl)
    assert out.read_bytes() == (folder / "Fdump.bin").read_bytes()


def test_golden_has_fdump_cases():
    if not GOLDEN.is_dir():
        pytest.skip("golden data (/work/shared/golden) not available")
    assert len(golden_fdump_cases()) >= 5


def test_stale_fdump_scenario():
    # second run of golden stale_fdump: -default_F 100 and no -hkl, reading the
    # first run's cache; in-box cells keep the first run's values (F000 = 10)
    dump = read_fdump(FDUMP, default_F=100)
    assert dump.lookup(0, 0, 0) == 10.0
    assert dump.lookup(5, 0, 0) == 100.0
    assert dump.listed.all()  # no cell equals 100


def test_default_none_means_zero():
    dump = read_fdump(FDUMP)
    assert dump.default_F == 0.0
    assert dump.listed.all()


def test_round_trip_with_unlisted_cells(tmp_path):
    src = tmp_path / "s.hkl"
    src.write_text("-1 0 3 2.5\n1 2 3 -7.25\n0 0 0 1e-300\n")
    table = read_hkl(src, default_F=4.0)
    out = tmp_path / "Fdump.bin"
    write_fdump(out, table)
    back = read_fdump(out, default_F=4.0)
    assert back.same_values(table)
    assert np.array_equal(back.listed, table.listed)
    assert out.read_bytes().startswith(b"-1 1 0 2 0 3\n\f")


def _corrupt(tmp_path, data, name="Fdump.bin"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_payload_is_an_error(tmp_path):
    p = _corrupt(tmp_path, FDUMP.read_bytes()[:-8])
    with pytest.raises(HKLFormatError, match="truncated: 1720 bytes after the header, expected 1728") as info:
        read_fdump(p)
    assert str(p) in str(info.value)


def test_trailing_bytes_are_an_error(tmp_path):
    p = _corrupt(tmp_path, FDUMP.read_bytes() + b"\0")
    with pytest.raises(HKLFormatError, match="trailing bytes"):
        read_fdump(p)


def test_missing_form_feed_is_an_error(tmp_path):
    data = FDUMP.read_bytes().replace(b"\n\f", b"\n", 1)
    with pytest.raises(HKLFormatError, match="form feed") as info:
        read_fdump(_corrupt(tmp_path, data))
    assert info.value.line == 1


def test_hkl_text_is_not_an_fdump():
    with pytest.raises(HKLFormatError, match="six integers") as info:
        read_fdump(DATA / "f_hkl_m2p2.hkl")
    assert str(info.value).startswith(f"{DATA / 'f_hkl_m2p2.hkl'}:1: ")
    assert info.value.text == "-2 -2 -2 22"


@pytest.mark.parametrize(
    "data, reason",
    [
        (bytes(range(11, 256)) * 2, "no header line"),
        (bytes(range(255, 0, -1)), "binary header"),
        (bytes(range(256)), "six integers"),
    ],
)
def test_binary_garbage_is_not_an_fdump(tmp_path, data, reason):
    with pytest.raises(HKLFormatError, match=reason) as info:
        read_fdump(_corrupt(tmp_path, data))
    assert str(tmp_path / "Fdump.bin") in str(info.value)


def test_empty_range_is_an_error(tmp_path):
    with pytest.raises(HKLFormatError, match="empty index range"):
        read_fdump(_corrupt(tmp_path, b"2 1 0 0 0 0\n\f"))


def test_nonzero_padding_warns(tmp_path):
    data = bytearray(FDUMP.read_bytes())
    data[-8:] = np.float64(3.0).tobytes()
    with pytest.warns(HKLWarning, match="padding"):
        dump = read_fdump(_corrupt(tmp_path, bytes(data)), default_F=50)
    assert dump.same_values(read_hkl(DATA / "f_hkl_m2p2.hkl", 50))
