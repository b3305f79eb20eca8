"""Differentiable renders: gradcheck of every parameter family, forward parity, errors."""

import numpy as np
import pytest
import torch

from torchbragg import Simulation
from torchbragg.differentiable import PARAMETER_FAMILIES, GradientError, arguments_with

BASE = ["-cell", "70", "80", "90", "88", "92", "95", "-default_F", "100", "-N", "4", "-pixel", "0.5",
        "-distance", "60", "-detpixels", "10", "-misset", "10", "20", "30", "-oversample", "1",
        "-lambda", "1.2"]

#: per family: the step of the normalised input (flag units per unit of input)
#: mosaic: the image is a staircase at 1e-7 of the spread (C draws the angles in single precision), so its
#: finite differences need a step of 0.01 degree
SCALES = {"distance": 1.0, "beam_center": 0.1, "detector_rotation": 1.0, "twotheta": 1.0, "misset": 1.0,
          "cell": 1.0, "N": 1.0, "mosaic": 1e4, "wavelength": 0.01, "dispersion": 0.1, "default_F": 10.0,
          "F": 10.0}
GEOMETRY = ["distance", "beam_center", "detector_rotation", "twotheta", "misset", "cell", "wavelength"]


def _hkl(tmp_path):
    """A table with holes: every reflection with h + k + l divisible by 3 is missing (default_F there)."""
    lines = []
    rng = np.random.default_rng(3)
    for h in range(-4, 5):
        for k in range(-4, 5):
            for lz in range(-4, 5):
                if (h + k + lz) % 3:
                    lines.append(f"{h} {k} {lz} {rng.uniform(20, 200):.3f}")
    path = tmp_path / "holes.hkl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


CASES = {
    "square": ([], GEOMETRY + ["N", "fluence", "default_F"]),
    "round": (["-round_xtal"], ["distance", "misset", "cell", "N"]),
    "gauss": (["-gauss_xtal"], ["beam_center", "cell", "N"]),
    "mosaic_phi": (["-mosaic", "0.8", "-mosaic_domains", "3", "-phi", "0", "-osc", "0.4", "-phisteps", "2"],
                   ["mosaic", "misset", "distance"]),
    "divergence_dispersion": (["-hdivrange", "0.4", "-hdivsteps", "2", "-dispersion", "0.5", "-dispsteps", "2"],
                              ["dispersion", "wavelength", "beam_center"]),
    "thickness": (["-detector_thick", "300", "-detector_thicksteps", "2", "-oversample", "2"],
                  ["distance", "detector_rotation", "twotheta"]),
    "xds": (["-xds", "-ORGX", "5.2", "-ORGY", "4.7", "-detector_rotx", "2"], ["beam_center", "distance", "twotheta"]),
    "dials": (["-dials", "-detector_roty", "3"], ["beam_center", "distance", "misset"]),
    "kahn": (["-polar", "0.9", "-Xbeam", "2.5", "-Ybeam", "2.5"], ["beam_center", "distance"]),
}


def _sim(args, names, tmp_path=None):
    return Simulation.from_args(BASE + list(args), dtype=torch.float64, requires_grad=names)


def _check(sim, name):
    leaf = sim.parameters()[name]
    p0 = leaf.detach().clone()
    scale = SCALES.get(name, 1.0) if name != "fluence" else float(p0[0]) * 1e-3
    weights = torch.linspace(0.5, 1.5, sim.shape[0] * sim.shape[1], dtype=torch.float64).reshape(sim.shape)
    norm = float((sim.render().detach() * weights).sum()) or 1.0

    def f(u):
        return (sim.gradients.render(values={name: p0 + scale * u}) * weights).sum() / norm

    u = torch.zeros_like(p0, requires_grad=True)
    assert torch.autograd.gradcheck(f, (u,), eps=1e-6, atol=1e-6, rtol=1e-4)
    return f, u


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck_families(case):
    args, names = CASES[case]
    sim = _sim(args, names)
    for name in names:
        _check(sim, name)


def test_gradcheck_structure_factors_nearest_and_tricubic(tmp_path):
    hkl = _hkl(tmp_path)
    for extra in ([], ["-interpolate", "-N", "2"]):
        sim = Simulation.from_args(BASE + ["-hkl", hkl, "-default_F", "7"] + extra, dtype=torch.float64,
                                   requires_grad=["F", "default_F", "distance"])
        assert sim.setup.interpolate == bool(extra)
        for name in ("default_F", "distance"):
            _check(sim, name)
        # F: one gradient per listed reflection; check the ones this image touches by finite differences
        img = sim.render()
        (img.sum()).backward()
        g = sim.parameters()["F"].grad
        assert g.shape == (len(sim.gradients.reflections()),)
        touched = torch.nonzero(g).flatten()
        assert touched.numel() > 0
        if extra:
            assert touched.numel() > 8  # tricubic spreads each lookup over its 4x4x4 neighbours
        p0 = sim.parameters()["F"].detach().clone()
        for i in touched[:4].tolist():
            h = 1e-3
            vals = []
            for sign in (1, -1):
                p = p0.clone()
                p[i] += sign * h
                with torch.no_grad():
                    vals.append(float(sim.gradients.render(values={"F": p}).sum()))
            fd = (vals[0] - vals[1]) / (2 * h)
            assert abs(fd - float(g[i])) <= 1e-6 * max(1.0, abs(fd))
        # the default_F gradient is non-zero: some lookups land on missing reflections
        sim.parameters()["default_F"].grad = None
        sim.render().sum().backward()
        assert float(sim.parameters()["default_F"].grad) != 0.0


def test_forward_equals_normal_render_and_no_change_without_gradients():
    plain = Simulation.from_args(BASE, dtype=torch.float64)
    ref = plain.render()
    assert ref.grad_fn is None
    sim = _sim([], ["distance", "misset", "cell"])
    img = sim.render()
    assert img.grad_fn is not None
    assert torch.equal(img.detach(), ref)
    assert sim.parameters()["distance"].item() == 60.0
    assert sim.parameters()["cell"].tolist() == [70.0, 80.0, 90.0, 88.0, 92.0, 95.0]


def test_changed_leaf_renders_the_new_value():
    sim = _sim([], ["distance"])
    with torch.no_grad():
        sim.parameters()["distance"].fill_(61.5)
    moved = sim.render().detach()
    direct = Simulation.from_args(BASE + ["-distance", "61.5"], dtype=torch.float64).render()
    assert torch.equal(moved, direct)


def test_singular_points_have_finite_derivatives():
    # MOSFLM default centre on a pixel centre (2θ = 0 at a subpixel), with Kahn polarisation; round crystal
    # at a Bragg peak (hrad = 0); an odd detector so the direct beam hits a subpixel centre
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-N", "3", "-detpixels", "9",
            "-pixel", "0.1", "-distance", "100", "-polar", "0.5", "-oversample", "1"]
    for shape in ([], ["-round_xtal"]):
        sim = Simulation.from_args(args + shape, dtype=torch.float64,
                                   requires_grad=["distance", "beam_center", "misset", "N"])
        sim.render().sum().backward()
        for name, leaf in sim.parameters().items():
            assert torch.isfinite(leaf.grad).all(), name


def test_bounded_memory_chunks_give_the_same_gradient(monkeypatch):
    import torchbragg.differentiable as d

    sim = _sim([], ["misset", "distance"])
    sim.gradients.backward_kernel = "eager"
    sim.render().pow(2).sum().backward()
    whole = {n: p.grad.clone() for n, p in sim.parameters().items()}
    monkeypatch.setattr(d, "BACKWARD_EVALUATIONS_PER_CHUNK", 3)  # blocks of 3 pixels
    sim2 = _sim([], ["misset", "distance"])
    sim2.gradients.backward_kernel = "eager"
    sim2.render().pow(2).sum().backward()
    assert sim2.gradients.last_backward.startswith("eager kernel")
    for n, g in whole.items():
        assert torch.allclose(sim2.parameters()[n].grad, g, rtol=1e-12, atol=0)


def test_errors_name_the_parameter():
    with pytest.raises(GradientError, match="unknown parameter 'distanc'"):
        _sim([], ["distanc"])
    with pytest.raises(GradientError, match="mosaic: differentiable only"):
        _sim([], ["mosaic"])
    with pytest.raises(GradientError, match="dispersion: differentiable only"):
        _sim([], ["dispersion"])
    with pytest.raises(GradientError, match="F: no structure-factor table"):
        _sim([], ["F"])


def test_fitted_arguments_round_trip():
    sim = _sim(["-Xbeam", "2.5", "-wavelength", "1.1"], ["distance", "beam_center", "misset", "wavelength"])
    with torch.no_grad():
        sim.parameters()["distance"].fill_(61.25)
        sim.parameters()["beam_center"].copy_(torch.tensor([2.75, 2.4]))
        sim.parameters()["wavelength"].fill_(1.15)
    args = sim.gradients.fitted_args()
    assert args.count("-distance") == 1 and "-wavelength" not in args and "-lambda" in args
    again = Simulation.from_args(args, dtype=torch.float64)
    assert torch.equal(again.render(), sim.render().detach())
    cfg = sim.gradients.base_config
    assert arguments_with(["-distance", "5"], cfg, sim.setup, {"distance": [7.5]}) == ["-distance", "7.5"]


def test_every_family_is_documented():
    for f in PARAMETER_FAMILIES.values():
        assert f.doc and len(f.units) >= 1


def test_backward_uses_the_set_up_of_its_own_forward():
    sim = _sim([], ["distance"])
    leaf = sim.parameters()["distance"]
    sim.render().sum().backward()
    direct = leaf.grad.clone()
    leaf.grad = None
    loss = sim.render().sum()
    with torch.no_grad():  # another render at another value before the backward pass
        sim.gradients.render(values={"distance": leaf.detach() + 3.0})
    loss.backward()
    assert torch.equal(leaf.grad, direct)


def test_float32_render_keeps_float64_parameters_and_parity():
    plain = Simulation.from_args(BASE + ["-Xbeam", "2.4251"])
    sim = Simulation.from_args(BASE + ["-Xbeam", "2.4251"], requires_grad=["beam_center", "distance"])
    assert sim.parameters()["beam_center"].dtype == torch.float64
    img = sim.render()
    assert img.dtype == torch.float32 and torch.equal(img.detach(), plain.render())
    (img.double() ** 2).sum().backward()
    assert torch.isfinite(sim.parameters()["beam_center"].grad).all()


def test_sensitivity_tap_matches_finite_differences_and_validates(tmp_path):
    import json

    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    hkl = _hkl(tmp_path)
    sim = Simulation.from_args(BASE + ["-hkl", hkl, "-default_F", "7"], dtype=torch.float64)
    slow, fast = 4, 6
    tap = sim.tap(slow, fast, taps=("sensitivity",))
    doc = tap.to_json("sensitivity")
    schema = json.loads((Path(__file__).resolve().parents[2] / "specs" / "tap_schema.json").read_text())
    jsonschema.validate(doc, schema)
    values = doc["values"]
    assert values["intensity"] == pytest.approx(float(sim.render()[slow, fast]), rel=1e-12)
    assert "mosaic" in values["not_differentiable"] and "dispersion" in values["not_differentiable"]
    assert values["reflections"], "the pixel's structure factors"
    rec = {(r["family"], r["component"]): r for r in values["parameters"]}
    # distance: compare with a render 0.01 mm either side
    for key, flag, h in ((("distance", "distance"), "-distance", 1e-3), (("misset", "y"), None, 1e-3)):
        vals = []
        for sign in (1, -1):
            if flag:
                args = BASE + ["-hkl", hkl, "-default_F", "7", flag, str(60 + sign * h)]
            else:
                args = BASE + ["-hkl", hkl, "-default_F", "7", "-misset", "10", str(20 + sign * h), "30"]
            vals.append(float(Simulation.from_args(args, dtype=torch.float64).render()[slow, fast]))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert rec[key]["dI_dp"] == pytest.approx(fd, rel=1e-5, abs=1e-12)
    # the sensitivity does not touch the simulation it was asked of
    assert sim.gradients is None and torch.equal(sim.render(), Simulation.from_args(
        BASE + ["-hkl", hkl, "-default_F", "7"], dtype=torch.float64).render())


def test_fallback_render_follows_the_parameters():
    sim = _sim([], ["distance"])
    with torch.no_grad():
        sim.parameters()["distance"].fill_(62.0)
    image, _ = sim.render_with_fallback()
    assert torch.equal(image, Simulation.from_args(BASE + ["-distance", "62"], dtype=torch.float64).render())
