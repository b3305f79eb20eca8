"""Fitting a reference: known offsets recovered from engine images; fit.json; CLI errors."""

import json

import numpy as np
import pytest
import torch

from torchbragg import Simulation
from torchbragg.cli.command import main
from torchbragg.fit import FitError, fit_reference

BASE = ["-cell", "60", "60", "60", "90", "90", "90", "-default_F", "100", "-N", "6", "-lambda", "1",
        "-distance", "100", "-pixel", "0.2", "-detpixels", "96", "-oversample", "1", "-misset", "5", "10", "15"]


def _reference(extra):
    return Simulation.from_args(BASE + extra, dtype=torch.float64).render().numpy()


def _within(found, offset, floor):
    return abs(found - offset) <= max(0.05 * abs(offset), floor)


def test_recovers_beam_centre_half_pixel_distance_and_misset():
    start = Simulation.from_args(BASE, dtype=torch.float64).setup
    x0 = start.xbeam * 1e3
    cases = [
        ("beam_center", ["-Xbeam", repr(x0 + 0.1)], {("beam_center", "x"): 0.1, ("beam_center", "y"): 0.0}, 0.02 * 0.2),
        ("distance", ["-distance", "101"], {("distance", "distance"): 1.0}, 0.01),
        ("misset", ["-misset", "5.2", "10", "15"], {("misset", "x"): 0.2, ("misset", "y"): 0.0,
                                                    ("misset", "z"): 0.0}, 0.002),
    ]
    for name, extra, expected, floor in cases:
        result = fit_reference(BASE, _reference(extra), name, max_iter=40)
        got = {(p["family"], p["component"]): p for p in result.parameters}
        for key, offset in expected.items():
            assert _within(got[key]["offset"], offset, floor), (key, got[key])
            assert got[key]["uncertainty"] is not None and got[key]["uncertainty"] < floor
        assert result.metrics_after["rmsd"] < 1e-3 * result.metrics_before["rmsd"]
        # the fitted arguments render the reference
        again = Simulation.from_args(result.fitted_args, dtype=torch.float64).render().numpy()
        assert np.abs(again - _reference(extra)).max() < 1e-3


def test_joint_fit_with_roi_and_poisson():
    ref = _reference(["-distance", "100.6", "-misset", "5.1", "10", "15"])
    result = fit_reference(BASE, ref, "distance,misset", roi=(10, 85, 5, 90), loss="poisson", max_iter=60)
    got = {(p["family"], p["component"]): p["offset"] for p in result.parameters}
    assert _within(got[("distance", "distance")], 0.6, 0.01)
    assert _within(got[("misset", "x")], 0.1, 0.002)
    assert result.metrics_after["pixels"] == 76 * 86


def test_fit_request_errors():
    ref = _reference([])
    with pytest.raises(FitError, match="unknown parameter 'distanse'"):
        fit_reference(BASE, ref, "distanse")
    with pytest.raises(FitError, match="can be differentiated but not fitted"):
        fit_reference(BASE, ref, "N")
    with pytest.raises(FitError, match="reference: 10x10 pixels"):
        fit_reference(BASE, np.zeros((10, 10)), "distance")
    with pytest.raises(FitError, match="--roi 5 200 0 10"):
        fit_reference(BASE, ref, "distance", roi=(5, 200, 0, 10))


def test_cli_writes_fit_json_and_refuses_to_overwrite(tmp_path, capsys):
    ref = _reference(["-distance", "101"]).astype(np.float32)
    path = tmp_path / "ref.bin"
    ref.tofile(path)
    out = tmp_path / "fit"
    code = main(["fit", str(path), "--params", "distance", "--out", str(out), "--"] + BASE)
    assert code == 0
    text = capsys.readouterr().out
    assert "distance distance (-distance): 100 -> 101" in text
    doc = json.loads((out / "fit.json").read_text())
    (p,) = doc["parameters"]
    assert p["flag"] == "-distance" and p["unit"] == "mm" and abs(p["fitted"] - 101) < 0.01
    assert set(p) >= {"start", "fitted", "uncertainty", "unit", "flag"}
    assert abs(float(doc["fitted_args"][doc["fitted_args"].index("-distance") + 1]) - 101) < 0.01
    assert doc["metrics_after"]["rmsd"] < doc["metrics_before"]["rmsd"]
    before = (out / "fit.json").read_bytes()
    assert main(["fit", str(path), "--params", "distance", "--out", str(out), "--"] + BASE) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
    assert (out / "fit.json").read_bytes() == before
    assert main(["fit", str(path), "--params", "distance", "--bogus", "--"] + BASE) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchbragg fit: error:") and err.count("\n") == 1
