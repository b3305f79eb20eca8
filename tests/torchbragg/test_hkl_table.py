"""HKL text files -> dense structure-factor tables.

tests/data/file_formats holds copies of golden inputs:
``simple_cubic_with_comments.hkl`` (golden/inputs) and ``f_hkl_m2p2.hkl``
(golden/cases/hkl_partial_defaultF).
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from torchbragg.io.hkl_table import HKLFormatError, HKLTable, HKLWarning, read_hkl

DATA = Path(__file__).resolve().parents[1] / "data" / "file_formats"
GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"


def golden():
    if not GOLDEN.is_dir():
        pytest.skip("golden data (/work/shared/golden) not available")
    return GOLDEN


def write(tmp_path, text, name="t.hkl"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --- real data ---------------------------------------------------------------

def test_commented_file_reads_like_its_comment_free_copy():
    table = read_hkl(DATA / "simple_cubic_with_comments.hkl", 0.0)
    assert table.kind == "hkl"
    assert table.count == 27
    assert table.bounds == ((0, 2), (0, 2), (0, 2))
    assert table.shape == (3, 3, 3)
    assert table.values.dtype == np.float64
    assert np.all(table.values == 100.0)
    assert table.listed.all()
    assert table.warnings == []
    assert table.describe() == (
        "HKL table simple_cubic_with_comments.hkl: 27 reflections, "
        "h 0..2, k 0..2, l 0..2, default_F 0"
    )


def test_commented_file_matches_golden_comment_free_copy():
    g = golden()
    ours = read_hkl(g / "inputs" / "simple_cubic_with_comments.hkl")
    theirs = read_hkl(g / "cases" / "cubic_hkl_mosflm" / "simple_cubic_nocomment.hkl")
    assert ours.same_values(theirs)


def test_f_hkl_m2p2_with_default_50():
    table = read_hkl(DATA / "f_hkl_m2p2.hkl", 50)
    assert table.count == 125
    assert table.bounds == ((-2, 2), (-2, 2), (-2, 2))
    assert table.lookup(0, 0, 0) == 10.0  # F(000)=10 (golden README, stale_fdump note)
    assert table.lookup(-2, -2, -2) == 22.0
    assert table.lookup(-2, -1, 0) == 14.0
    assert table.lookup(3, 0, 0) == 50.0  # outside the box -> default_F
    assert table.describe() == (
        "HKL table f_hkl_m2p2.hkl: 125 reflections, h -2..2, k -2..2, l -2..2, default_F 50"
    )


def test_golden_hkl_files_have_the_bounds_the_c_log_reports():
    g = golden()
    cases = json.loads((g / "cases.json").read_text())
    seen = 0
    for name, case in cases.items():
        args = case.get("first_run_args", case["args"])
        if "-hkl" not in args:
            continue
        path = g / "cases" / name / args[args.index("-hkl") + 1]
        table = read_hkl(path)
        log = (g / "cases" / name / "log.txt").read_text()
        if name == "stale_fdump":
            continue  # its log is the second run's
        assert f"{table.count} initialized hkls" in log or table.count == 0
        seen += 1
    assert seen >= 5


# --- the C rules -------------------------------------------------------------

def test_unlisted_cells_hold_default_F(tmp_path):
    p = write(tmp_path, "0 0 0 10\n2 1 -1 7.5\n")
    table = read_hkl(p, default_F=3.0)
    assert table.bounds == ((0, 2), (0, 1), (-1, 0))
    assert table.values[0 - 0, 0 - 0, 0 + 1] == 10.0
    assert table.values[2, 1, 0] == 7.5
    assert table.listed.sum() == 2
    assert np.all(table.values[~table.listed] == 3.0)
    assert table.lookup(1, 0, 0) == 3.0  # inside the box, not listed


def test_zero_default_fill_is_positive_zero(tmp_path):
    table = read_hkl(write(tmp_path, "0 0 0 1\n1 0 0 2\n"), default_F=-0.0)
    box = table.values.copy()
    box[table.listed] = 1.0
    assert not np.signbit(box).any()  # C leaves its calloc'ed +0.0 when default_F == 0


def test_duplicates_last_one_wins_with_warning(tmp_path):
    p = write(tmp_path, "1 1 1 5\n0 0 0 1\n1 1 1 6\n1 1 1 7\n")
    with pytest.warns(HKLWarning, match="last one listed wins"):
        table = read_hkl(p)
    assert table.lookup(1, 1, 1) == 7.0
    assert table.count == 4
    assert any("lines 1, 3, 4" in w for w in table.warnings)


def test_non_integer_indices_truncate_toward_zero(tmp_path):
    p = write(tmp_path, "0 0 0 1\n1.7 0 0 2\n-1.7 0.2 0 3\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_hkl(p)
    assert [w.category for w in caught] == [HKLWarning] * 3
    assert "non-integer h = 1.7, stored at h = 1" in str(caught[0].message)
    assert table.bounds == ((-1, 1), (0, 0), (0, 0))
    assert table.lookup(1, 0, 0) == 2.0
    assert table.lookup(-1, 0, 0) == 3.0
    assert len(table.warnings) == 3  # h 1.7, h -1.7, k 0.2
    assert all(":" in w and "t.hkl" in w for w in table.warnings)


def test_decimal_point_integer_indices_are_accepted_with_warning(tmp_path):
    p = write(tmp_path, "1.0 2 3 4\n")
    with pytest.warns(HKLWarning, match="fill pass stops"):
        table = read_hkl(p)
    assert table.lookup(1, 2, 3) == 4.0


def test_many_warnings_are_summarised(tmp_path):
    text = "".join(f"{i}.5 0 0 1\n" for i in range(30))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_hkl(write(tmp_path, text))
    assert len(table.warnings) == 21
    assert "10 more lines with non-integer indices" in table.warnings[-1]
    assert len(caught) == 21


def test_comments_blank_lines_crlf_and_tabs(tmp_path):
    p = write(tmp_path, "# header\r\n\r\n 1\t2 3   4.5  # trailing\r\n#\n\t\n-1 -2 -3 1e2\n")
    table = read_hkl(p)
    assert table.count == 2
    assert table.lookup(1, 2, 3) == 4.5
    assert table.lookup(-1, -2, -3) == 100.0


# --- bad input -----------------------------------------------------------------

@pytest.mark.parametrize(
    "line, reason",
    [
        ("1 2 3", "expected 4 fields (h k l F), found 3"),
        ("1 2 3 4 5", "expected 4 fields (h k l F), found 5"),
        ("1 2 x 4", "l is not a finite number: 'x'"),
        ("1 2 3 abc", "F is not a finite number: 'abc'"),
        ("1 2 3 nan", "F is not a finite number: 'nan'"),
        ("1 2 3 inf", "F is not a finite number: 'inf'"),
        ("inf 2 3 4", "h is not a finite number: 'inf'"),
        ("1 2 3 1_0", "not a number: '1_0'"),
        ("1,2,3,4", "expected 4 fields (h k l F), found 1"),
    ],
)
def test_malformed_line_names_file_line_and_text(tmp_path, line, reason):
    p = write(tmp_path, f"0 0 0 1\n# comment\n{line}\n1 1 1 1\n")
    with pytest.raises(HKLFormatError) as info:
        read_hkl(p)
    err = info.value
    assert err.path == str(p)
    assert err.line == 3
    assert err.text == line
    assert err.reason == reason
    assert str(err) == f"{p}:3: {reason}: {line!r}"
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# another\n"])
def test_file_without_reflections_is_an_error(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(HKLFormatError, match="no reflections") as info:
        read_hkl(p)
    assert str(p) in str(info.value)
    assert info.value.line is None


def test_absurd_index_box_is_refused_naming_the_line(tmp_path):
    p = write(tmp_path, "0 0 0 1\n100000 100000 0 1\n-100000 0 0 1\n")
    with pytest.raises(HKLFormatError, match="cells, more than") as info:
        read_hkl(p)
    assert info.value.line in (2, 3)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        read_hkl(DATA / "no_such_file.hkl")


def test_table_validates_its_shape():
    with pytest.raises(ValueError, match="do not match"):
        HKLTable(
            values=np.zeros((2, 2, 2)), listed=np.zeros((2, 2, 2), bool),
            h_min=0, h_max=2, k_min=0, k_max=1, l_min=0, l_max=1,
            default_F=0.0, source="x", kind="hkl", count=0,
        )


# --------------------------------------------------------------------------- the fast path
PLAIN_CASES = {
    "plain": "0 0 0 10\n1 -2 3 4.5\n-1 2 -3 1e2\n2 2 2 -7\n",
    "no final newline": "0 0 0 10\n1 1 1 2.5",
    "tabs and signs": "+1\t-2\t3\t4.25\n  0   0   0   1  \n",
    "duplicates": "1 1 1 5\n2 2 2 6\n1 1 1 7\n",
}
LINE_RULES = {  # each needs the line-by-line reader: the fast path must step aside
    "comment": "1 1 1 5 # strong\n2 2 2 6\n",
    "blank line": "1 1 1 5\n\n2 2 2 6\n",
    "crlf": "1 1 1 5\r\n2 2 2 6\r\n",
    "decimal index": "1.0 1 1 5\n2 2 2 6\n",
    "five fields": "1 1 1 5 9\n",
    "nan": "1 1 1 nan\n",
    "underscore": "1_0 1 1 5\n",
}


@pytest.mark.parametrize("name", PLAIN_CASES)
def test_plain_files_take_the_fast_path_with_the_same_table(tmp_path, name, monkeypatch):
    from torchbragg.io import hkl_table

    path = tmp_path / "t.hkl"
    path.write_text(PLAIN_CASES[name])
    with warnings.catch_warnings(record=True) as slow_warn:
        warnings.simplefilter("always")
        monkeypatch.setattr(hkl_table, "_parse_plain", lambda raw: None)
        slow = read_hkl(path, default_F=3.0)
    monkeypatch.undo()
    assert hkl_table._parse_plain(path.read_bytes()) is not None

    def refuse(*a):
        raise AssertionError("the line-by-line reader ran")

    monkeypatch.setattr(hkl_table, "_parse_lines", refuse)
    with warnings.catch_warnings(record=True) as fast_warn:
        warnings.simplefilter("always")
        fast = read_hkl(path, default_F=3.0)
    np.testing.assert_array_equal(fast.values, slow.values)
    np.testing.assert_array_equal(fast.listed, slow.listed)
    assert (fast.h_min, fast.h_max, fast.k_min, fast.k_max, fast.l_min, fast.l_max, fast.count) == (
        slow.h_min, slow.h_max, slow.k_min, slow.k_max, slow.l_min, slow.l_max, slow.count)
    assert fast.warnings == slow.warnings
    assert [str(w.message) for w in fast_warn] == [str(w.message) for w in slow_warn]


@pytest.mark.parametrize("name", LINE_RULES)
def test_files_with_line_rules_are_read_line_by_line(name):
    from torchbragg.io import hkl_table

    assert hkl_table._parse_plain(LINE_RULES[name].encode()) is None
