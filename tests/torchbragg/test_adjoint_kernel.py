"""The compiled CPU adjoint kernel against the eager kernel's autograd (the reference)."""

import numpy as np
import pytest
import torch
from test_gradients import BASE, CASES, _hkl

from torchbragg import Simulation
from torchbragg.io.smv import write_smv
from torchbragg.kernels.cpu_adjoint import cpu_adjoint_function, run_adjoint
from torchbragg.simulation import RenderCancelled

pytestmark = pytest.mark.skipif(cpu_adjoint_function("square", False) is None,
                                reason="no C++ compiler for the compiled kernels")

#: set-ups beyond the gradcheck families: the adjoint's own branches (table scatter, -dmin's later
#: polarisation, point pixels, ROI and mask, sample pivot, non-square shapes with tables and domains)
MORE = {
    "table": (["-hkl", "{hkl}", "-default_F", "7"], ["F", "default_F", "distance", "misset"]),
    "round_table": (["-round_xtal", "-hkl", "{hkl}"], ["F", "default_F", "cell", "N"]),
    "gauss_mosaic": (["-gauss_xtal", "-mosaic", "0.5", "-mosaic_domains", "2"], ["cell", "misset", "mosaic", "N"]),
    "tophat": (["-tophat_spots"], ["distance", "N", "beam_center"]),
    # -dmin skipping evaluations, with pixels whose first polarisation is a later (subpixel, source)
    "dmin": (["-dmin", "36.548", "-polar", "0.6", "-oversample", "2", "-hdivrange", "0.6", "-hdivsteps", "3",
              "-detector_thick", "200", "-detector_thicksteps", "2"],
             ["distance", "misset", "beam_center", "wavelength", "detector_rotation"]),
    "point_pixel": (["-point_pixel", "-polar", "0.7"], ["distance", "beam_center", "wavelength"]),
    "roi": (["-roi", "2", "7", "1", "8"], ["distance", "misset", "cell"]),
    # the phi = 0 quirk's own lattice on the first rendered pixel, (0, 2) with this mask
    "mask": (["-mask", "{mask}", "-mosaic", "0.3", "-mosaic_domains", "2", "-phi", "0", "-osc", "0.4",
              "-phisteps", "2"], ["distance", "misset", "mosaic"]),
    "pivot_sample": (["-pivot", "sample", "-twotheta", "10"], ["distance", "beam_center", "twotheta"]),
}


def _files(tmp_path):
    mask = np.ones((10, 10), np.uint16)
    mask[0, :2] = 0  # the first rendered pixel (the phi = 0 quirk's) moves to (0, 2), a bright one
    mask[4:6, 2:7] = 0
    write_smv(tmp_path / "mask.smv", mask, {})
    return {"hkl": _hkl(tmp_path), "mask": str(tmp_path / "mask.smv")}


def _gradients(args, names, kernel, dtype=torch.float64, cwd=None):
    sim = Simulation.from_args(BASE + list(args), dtype=dtype, requires_grad=names, cwd=cwd)
    sim.gradients.backward_kernel = kernel
    img = sim.render()
    weights = torch.linspace(0.5, 1.5, img.numel(), dtype=torch.float64).reshape(img.shape)
    (weights * img.to(torch.float64) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in sim.parameters().items()}, sim.gradients.last_backward


@pytest.mark.parametrize("case", sorted(CASES) + sorted(MORE))
def test_compiled_adjoint_equals_the_eager_gradient(case, tmp_path):
    args, names = CASES[case] if case in CASES else MORE[case]
    files = _files(tmp_path)
    args = [a.format(**files) for a in args]
    compiled, how = _gradients(args, names, "auto", cwd=str(tmp_path))
    eager, how_eager = _gradients(args, names, "eager", cwd=str(tmp_path))
    assert how == "compiled CPU adjoint"
    assert how_eager.startswith("eager kernel")
    if case == "dmin":  # the limit cuts through the detector
        plain = Simulation.from_args(BASE + args[2:], dtype=torch.float64).render()
        cut = Simulation.from_args(BASE + args, dtype=torch.float64).render()
        assert bool((cut != plain).any()) and bool((cut == plain).any())
    if case == "mask":
        sim = Simulation.from_args(BASE + args, dtype=torch.float64, cwd=str(tmp_path))
        assert sim.kernel_tensors.lattice_first is not None and sim.first_pixel() == (0, 2)
    for n in names:
        ref = eager[n]
        assert float(ref.abs().max()) > 0 or n in ("F",), n  # every family moves these images
        assert torch.allclose(compiled[n], ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max())), n


@pytest.mark.parametrize("extra, why", [
    (["-curved_det"], "-curved_det"),
    (["-hkl", "{hkl}", "-interpolate", "-N", "2"], "table interpolation"),
    (["-oversample", "2", "-oversample_omega"], "-oversample"),
    (["-N", "1"], "N of 1 or less"),
])
def test_set_ups_it_does_not_cover_use_the_eager_kernel(extra, why, tmp_path):
    files = _files(tmp_path)
    extra = [a.format(**files) for a in extra]
    names = ["distance", "N"] if why.startswith("N") else ["distance", "misset"]
    grads, how = _gradients(extra, names, "auto")
    assert how.startswith("eager kernel (") and why in how
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


def test_compiled_kernels_off_differentiates_eagerly(monkeypatch):
    monkeypatch.setenv("TORCHBRAGG_FAST", "0")
    grads, how = _gradients([], ["distance"], "auto")
    assert how == "eager kernel (compiled kernels off)"
    monkeypatch.delenv("TORCHBRAGG_FAST")
    again, how = _gradients([], ["distance"], "auto")
    assert how == "compiled CPU adjoint"
    assert torch.allclose(grads["distance"], again["distance"], rtol=1e-10)


def test_float32_render_gradient_matches_the_float64_reference():
    names = ["distance", "beam_center", "misset", "wavelength"]
    g32, how = _gradients([], names, "auto", dtype=torch.float32)
    g64, _ = _gradients([], names, "eager", dtype=torch.float64)
    assert how == "compiled CPU adjoint"
    for n in names:
        assert torch.allclose(g32[n], g64[n], rtol=2e-4, atol=2e-4 * float(g64[n].abs().max())), n


def test_threads_and_slices_do_not_change_the_sums():
    sim = Simulation.from_args(BASE + ["-detpixels", "40", "-oversample", "2"], dtype=torch.float64,
                               requires_grad=["distance"])
    img = sim.render().detach()
    plan = sim.compiled_plan()
    one = run_adjoint(plan, img, (0, 39), (0, 39), threads=1)
    two = run_adjoint(plan, img, (0, 39), (0, 39), threads=2)
    for k in ("dp", "lattice", "src"):
        assert np.allclose(one[k], two[k], rtol=1e-12, atol=1e-12 * np.abs(one[k]).max()), k
    # a zero gradient outside a block costs nothing and adds nothing
    part = img.clone()
    part[:20] = 0
    lower = run_adjoint(plan, part, (0, 39), (0, 39))
    only = run_adjoint(plan, img, (20, 39), (0, 39))
    assert np.allclose(lower["lattice"], only["lattice"], rtol=1e-12)


def test_slices_give_the_same_gradient_with_progress(monkeypatch):
    import torchbragg.kernels.cpu_adjoint as adjoint

    sim = Simulation.from_args(BASE + ["-detpixels", "30", "-oversample", "2"], dtype=torch.float64,
                               requires_grad=["distance", "misset"])
    sim.render().pow(2).sum().backward()
    whole = {n: p.grad.clone() for n, p in sim.parameters().items()}
    monkeypatch.setattr(adjoint, "ADJOINT_EVALUATIONS_PER_SLICE", 4 * 30)  # one row a slice
    seen = []
    img = sim.gradients.render(progress=lambda done, total: seen.append(done))
    seen.clear()
    for p in sim.parameters().values():
        p.grad = None
    img.pow(2).sum().backward()
    assert seen and seen[-1] == 30 and seen == sorted(seen)
    for n, g in whole.items():
        assert torch.allclose(sim.parameters()[n].grad, g, rtol=1e-12, atol=0), n


def test_the_gradient_is_the_same_bit_for_bit_on_every_run(monkeypatch, tmp_path):
    import torchbragg.kernels.cpu_adjoint as adjoint

    monkeypatch.setattr(adjoint, "ADJOINT_EVALUATIONS_PER_SLICE", 8 * 40)  # many slices on two threads
    hkl = _files(tmp_path)["hkl"]
    runs = []
    for _ in range(4):
        sim = Simulation.from_args(BASE + ["-detpixels", "40", "-oversample", "2", "-hkl", hkl], dtype=torch.float64,
                                   requires_grad=["distance", "misset", "F", "default_F"])
        sim.render().pow(2).sum().backward()
        assert sim.gradients.last_backward == "compiled CPU adjoint"
        runs.append(torch.cat([p.grad for p in sim.parameters().values()]))
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_a_failing_slice_stops_the_others_and_raises(monkeypatch):
    import time

    import torchbragg.kernels.cpu_adjoint as adjoint

    sim = Simulation.from_args(BASE + ["-detpixels", "24"], dtype=torch.float64, requires_grad=["distance"])
    img = sim.render().detach()
    plan = sim.compiled_plan()
    calls = []

    def kernel(*args):  # the compiled function's stand-in: the third slice fails
        calls.append(1)
        time.sleep(0.02)
        return 7 if len(calls) == 3 else 0

    monkeypatch.setattr(adjoint, "ADJOINT_EVALUATIONS_PER_SLICE", 24)  # one row a slice: 24 slices
    monkeypatch.setattr(adjoint, "cpu_adjoint_function", lambda shape, table: kernel)
    with pytest.raises(RuntimeError, match=r"CPU adjoint kernel failed \(7\)"):
        run_adjoint(plan, img, (0, 23), (0, 23), threads=2)
    settled = len(calls)
    time.sleep(0.2)
    assert len(calls) == settled < 24  # stopped, and nothing runs on after the call


def test_cancel_is_asked_in_the_calling_thread_and_heard_once():
    import threading

    sim = Simulation.from_args(BASE + ["-detpixels", "40"], dtype=torch.float64, requires_grad=["distance"])
    asked, answers = [], [True]  # yes once, then no: the first answer must stop the pass
    img = sim.gradients.render(should_cancel=lambda: asked.append(threading.get_ident()) or False)
    asked.clear()

    def once():
        asked.append(threading.get_ident())
        return answers.pop(0) if answers else False

    sim.gradients.should_cancel = once
    with pytest.raises(RenderCancelled):
        img.sum().backward()
    assert set(asked) == {threading.get_ident()}
    assert sim.gradients.last_backward == "compiled CPU adjoint"


def test_progress_and_cancel_of_the_compiled_backward():
    sim = Simulation.from_args(BASE + ["-detpixels", "24"], dtype=torch.float64, requires_grad=["distance"])
    seen = []
    img = sim.gradients.render(progress=lambda done, total: seen.append((done, total)))
    seen.clear()
    img.sum().backward()
    assert sim.gradients.last_backward == "compiled CPU adjoint"
    assert seen and seen[-1] == (24, 24) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    stop = []
    img = sim.gradients.render(should_cancel=lambda: bool(stop))
    stop.append(True)  # cancelled after the forward pass
    with pytest.raises(RenderCancelled):
        img.sum().backward()
