"""The launcher's start-up path: the first render made in a child process, shown as
soon as it is ready, then adopted (simulation, fallback map, kernel) with the panels
docked after the picture."""

from __future__ import annotations

import numpy as np
import pytest
from bragg_inspector import controller as ctl
from inspector_helpers import needs_engine, small_args

pytestmark = [pytest.mark.gui]


@needs_engine
def test_first_picture_from_the_child_then_adopted(viewer, small_hkl, tmp_path, qtbot, monkeypatch):
    from bragg_inspector import Inspector
    from bragg_inspector.launcher import _dock_after_first_picture
    from bragg_inspector.prerender import Prerender

    import torchbragg

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the child's hand-over folder, checked below
    args = small_args(small_hkl)
    insp = Inspector(viewer, dock=False, cwd=tmp_path)
    assert not insp.docked
    _dock_after_first_picture(viewer, insp)
    pre = Prerender(args, "cpu", "float32")
    insp.controller.adopt_prerender(pre, args, "cpu", "float32")
    qtbot.waitUntil(lambda: insp.controller.first_picture_shown, timeout=60_000)
    qtbot.waitUntil(lambda: insp.docked and not insp.controller.running and insp.model.sim is not None,
                    timeout=60_000)

    sim = torchbragg.Simulation.from_args(args, cwd=str(tmp_path))
    img, fmap = sim.render_with_fallback()
    np.testing.assert_array_equal(viewer.layers[ctl.SIM_LAYER].data, img.numpy())
    np.testing.assert_array_equal(insp.model.fallback.counts, fmap.counts.numpy())
    np.testing.assert_array_equal(insp.model.fallback.reason, fmap.reason.numpy())
    # the record names the kernel that rendered the image shown (the child's)
    assert insp.model.sim.last_kernel == sim.last_kernel
    assert "None" not in insp.simulation_widget.status_label.value
    assert sim.last_kernel in insp.simulation_widget.status_label.value
    assert not list(tmp_path.glob("bragg-inspector-*"))  # the hand-over folder is gone
    # and the image is live: taps and hover work
    assert insp.click(32, 32) is not None
    assert "hkl" in insp.hover(32, 32)
