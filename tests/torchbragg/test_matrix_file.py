"""MOSFLM A-matrix files (the C program's -mat).

tests/data/file_formats/A.mat is golden/cases/mat_P1hkl/A.mat; the expected
numbers below are what the C program printed in that case's log.txt
(``-mat A.mat -lambda 6.2``).
"""

from pathlib import Path

import numpy as np
import pytest

from torchbragg.io.matrix_file import MatrixFormatError, mosflm_reciprocal_vectors, read_mosflm_matrix

DATA = Path(__file__).resolve().parents[1] / "data" / "file_formats"
GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
AMAT = DATA / "A.mat"


def test_raw_matrix_is_the_file_as_written():
    m = read_mosflm_matrix(AMAT)
    assert m.shape == (3, 3) and m.dtype == np.float64
    assert m[0].tolist() == [-0.02837711, -0.00305386, 0.02535816]
    assert m[2].tolist() == [0.01050048, -0.03209440, -0.01036054]


def test_golden_copy_is_identical():
    if not GOLDEN.is_dir():
        pytest.skip("golden data (/work/shared/golden) not available")
    golden = GOLDEN / "cases" / "mat_P1hkl" / "A.mat"
    assert np.array_equal(read_mosflm_matrix(golden), read_mosflm_matrix(AMAT))


def test_reciprocal_vectors_are_columns_over_lambda():
    a_star, b_star, c_star = mosflm_reciprocal_vectors(read_mosflm_matrix(AMAT), 6.2)
    # "reciprocal-space cell vectors (Angstrom^-1)" table of the C log
    log_table = {
        "a": (-0.00457695, -0.00463127, 0.00169363),
        "b": (-0.00049256, 0.00164443, -0.00517652),
        "c": (0.00409003, -0.00225814, -0.00167105),
    }
    for got, want in zip((a_star, b_star, c_star), log_table.values(), strict=True):
        assert [f"{x:11.8f}" for x in got] == [f"{x:11.8f}" for x in want]


def test_direct_cell_matches_c_log():
    a_star, b_star, c_star = mosflm_reciprocal_vectors(read_mosflm_matrix(AMAT), 6.2)
    v_star = np.dot(a_star, np.cross(b_star, c_star))
    a = np.cross(b_star, c_star) / v_star
    b = np.cross(c_star, a_star) / v_star
    c = np.cross(a_star, b_star) / v_star
    lengths = [np.linalg.norm(v) for v in (a, b, c)]

    def angle(u, v):
        return np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)))

    cell = lengths + [angle(b, c), angle(a, c), angle(a, b)]
    # "Unit Cell: 169.798 198.732 213.733 88.687 71.5295 68.1375", "volume = 6.31165e+06 A^3"
    assert [f"{x:g}" for x in cell] == ["169.798", "198.732", "213.733", "88.687", "71.5295", "68.1375"]
    assert f"{1.0 / v_star:g}" == "6.31165e+06"
    # real-space X row of the log: a_x b_x c_x
    assert [f"{x:11.8f}" for x in (a[0], b[0], c[0])] == [
        "-91.12291975", "-72.98517652", "133.73637408"]


def test_layout_free_like_c(tmp_path):
    one_line = tmp_path / "one.mat"
    one_line.write_text(" ".join(AMAT.read_text().split()) + "\n")
    assert np.array_equal(read_mosflm_matrix(one_line), read_mosflm_matrix(AMAT))


def test_fortran_numbers_run_together_and_trailing_mosflm_lines(tmp_path):
    p = tmp_path / "mosflm.mat"
    p.write_text(
        " -0.02837711-0.00305386  0.02535816\n"
        " -0.02871390  0.01019549-0.01400049\n"
        "  0.01050048 -0.03209440 -0.01036054\n"
        "       0.000       0.000       0.000\n"
        " -0.5696  -0.1896  0.8000\n"
        "SYMM P1\n"
    )
    assert np.array_equal(read_mosflm_matrix(p), read_mosflm_matrix(AMAT))


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("1 0 0\n0 1 0\n", None, "found only 6 of the 9 numbers"),
        ("", None, "found only 0 of the 9 numbers"),
        ("1 0 0\n0 x 0\n0 0 1\n", 2, "expected a number (matrix element 5 of 9), found 'x'"),
        ("1 0 0\n0 1 0\n0 0 1abc\n", 3, "not a number: '1abc'"),
        ("1 0 0\n0 1 0\n0 0 nan\n", 3, "expected a number (matrix element 9 of 9), found 'nan'"),
        ("1 0 0\n2 0 0\n0 0 1\n", None, "singular"),
    ],
)
def test_bad_matrix_names_file_and_line(tmp_path, text, line, reason):
    p = tmp_path / "bad.mat"
    p.write_text(text)
    with pytest.raises(MatrixFormatError) as info:
        read_mosflm_matrix(p)
    err = info.value
    assert err.line == line
    assert reason in str(err)
    prefix = f"{p}:{line}: " if line is not None else f"{p}: "
    assert str(err).startswith(prefix)


def test_bad_wavelength():
    with pytest.raises(ValueError, match="wavelength"):
        mosflm_reciprocal_vectors(np.eye(3), 0.0)
