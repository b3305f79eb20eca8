"""Connects the Qt-free :class:`~bragg_inspector.model.InspectorModel` to a
napari viewer: layers, the click callback, the flip key and the render job.

No widgets here: panels subscribe to the psygnal signals below and call the
public methods.  Qt is touched only to run the render in a worker thread
(``napari.qt.threading``) when a Qt application exists.
"""

from __future__ import annotations

import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from . import _engine
from .args import get_flag_value, join_args, set_flag_value, split_args
from .model import REASON_STYLE, Comparison, InspectorModel, TapRecord, percentile_limits

SIM_LAYER = "simulated"
TAP_LAYER = "tap"
SEL_LAYER = "selection"
FALLBACK_LAYER = "default_F regions"
REF_LAYER = "reference"
DIFF_LAYER = "difference (sim − ref)"
RATIO_LAYER = "ratio (sim / ref)"
FLIP_KEY = "Shift-F"
TAP_COLOUR = "#00c853"        # green: readable on the white background, the pink and the blue overlay
SELECTION_COLOUR = "#aa00ff"  # purple
DRAG_TOLERANCE_PX = 4.0  # press→release movement (screen px) that still counts as a click


def _has_shift(modifiers) -> bool:
    return any(getattr(m, "name", m) == "Shift" for m in (modifiers or ()))


class InspectorController:
    """One per viewer (see :func:`controller_for`)."""

    status = Signal(str, str)            # message, level ("info" | "busy" | "error")
    args_changed = Signal(object)        # list[str]
    render_started = Signal()
    render_progress = Signal(int, int)   # done rows, total rows
    render_finished = Signal(bool)       # True when a new image is shown
    rendered = Signal()                  # model.image / hkl_info / fallback are new
    tapped = Signal(object)              # TapRecord
    selection_changed = Signal()
    overlay_changed = Signal()
    compared = Signal(object)            # Comparison

    def __init__(self, viewer, cwd: str | None = None):
        self._viewer_ref = weakref.ref(viewer)
        self.model = InspectorModel(cwd=cwd)
        self.overlay_enabled = False
        self.upper_percentile = 99.9
        self.gamma = 1.0
        self.last_error: str | None = None
        self.timings: dict[str, float] = {}
        self.last_click_ms: dict[str, float] = {}  # tap / table (click → table filled) / total  # setup_s, render_s, show_s of the last render
        self.last_message: str = ""
        self._worker = None
        self._workers: set = set()  # kept alive until their thread has finished
        self._cancel = threading.Event()
        self._running = False
        self._pbar = None
        self._bridge = None
        viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        viewer.bind_key(FLIP_KEY, self._on_flip_key, overwrite=True)

    # ------------------------------------------------------------------ basics
    @property
    def viewer(self):
        v = self._viewer_ref()
        if v is None:
            raise RuntimeError("the viewer is gone")
        return v

    @property
    def running(self) -> bool:
        return self._running

    def _layer(self, name: str):
        layers = self.viewer.layers
        return layers[name] if name in layers else None

    def _info(self, msg: str, level: str = "info") -> None:
        self.last_message = msg
        if level != "error":
            self.last_error = None
        self.status.emit(msg, level)

    def report_error(self, exc: BaseException | str, context: str = "") -> str:
        """A clear message in the panel's status label and as a napari notification."""
        if isinstance(exc, BaseException):
            text = str(exc) or type(exc).__name__
            if not isinstance(exc, _engine.user_error_types()):
                text = f"{type(exc).__name__}: {text}"
        else:
            text = str(exc)
        msg = f"{context}: {text}" if context else text
        self.last_error = msg
        self.last_message = msg
        self.status.emit(msg, "error")
        try:
            from napari.utils.notifications import show_error

            show_error(msg)
        except Exception:  # pragma: no cover - notification machinery unavailable
            pass
        return msg

    # ------------------------------------------------------------------ arguments
    def set_args(self, args: str | Sequence[str]) -> list[str]:
        self.model.args = split_args(args)
        self.args_changed.emit(list(self.model.args))
        return self.model.args

    def set_hkl(self, path: str | None, args: str | Sequence[str] | None = None) -> list[str]:
        """Add or replace ``-hkl PATH`` (``None`` removes it)."""
        base = self.model.args if args is None else split_args(args)
        return self.set_args(set_flag_value(base, "-hkl", None if not path else str(path)))

    @staticmethod
    def hkl_of(args: Sequence[str]) -> str | None:
        return get_flag_value(args, "-hkl")

    # ------------------------------------------------------------------ rendering
    def simulate(self, args: str | Sequence[str] | None = None, *, device: str | None = None,
                 dtype: str | None = None, wait: bool = False, timeout: float | None = None) -> bool:
        """Render in a worker thread; the layers are replaced only when it succeeds.

        Returns True once started (``wait=False``) or when a new image is shown
        (``wait=True``); False on bad input (shown as a message)."""
        if self._running:
            self._info("a render is already running: cancel it first", "error")
            return False
        try:
            argv = split_args(args) if args is not None else list(self.model.args)
        except ValueError as exc:
            self.report_error(exc, "Bad argument line")
            return False
        device = device or self.model.device
        dtype = dtype or self.model.dtype
        self.model.args = list(argv)
        self.args_changed.emit(list(argv))

        self._cancel = threading.Event()
        self._running = True
        self._result: tuple[bool, Any] | None = None
        self.render_started.emit()
        self._info(f"rendering on {device} ({dtype})…", "busy")
        cancel = self._cancel
        model = self.model

        timings = self.timings = {}

        def job(progress=None):
            t0 = time.perf_counter()
            sim = model.prepare(argv, device, dtype)
            t1 = time.perf_counter()
            img, fb = _engine.render(sim, progress=progress, should_cancel=cancel.is_set)
            timings.update(setup_s=t1 - t0, render_s=time.perf_counter() - t1)
            return sim, img, fb

        try:
            from qtpy.QtWidgets import QApplication

            has_qt = QApplication.instance() is not None
        except Exception:  # pragma: no cover
            has_qt = False

        if not has_qt:  # headless ViewerModel: run here, same result handling
            try:
                res = job(progress=lambda d, t: self.render_progress.emit(int(d), int(t)))
            except BaseException as exc:  # noqa: BLE001 - shown to the user
                self._render_failed(exc)
            else:
                self._render_done(res, argv, device, dtype)
            return bool(self._result and self._result[0])

        self._start_worker(job, argv, device, dtype)
        if not wait:
            return True
        self.wait(timeout)
        return bool(self._result and self._result[0])

    def wait(self, timeout: float | None = None) -> None:
        """Block (running the Qt event loop, not polling) until the render ends;
        after ``timeout`` seconds the render is cancelled."""
        if not self._running:
            return
        from qtpy.QtCore import QEventLoop, QTimer

        loop = QEventLoop()

        def quit_(*_):
            loop.quit()

        self.render_finished.connect(quit_)
        timer = None
        if timeout is not None:
            timer = QTimer()
            timer.setSingleShot(True)
            timer.timeout.connect(self.cancel)
            timer.start(int(timeout * 1000))
        try:
            if self._running:
                loop.exec()
        finally:
            self.render_finished.disconnect(quit_)
            if timer is not None:
                timer.stop()

    def _start_worker(self, job, argv, device, dtype) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress as napari_progress
        from qtpy.QtCore import QObject, Signal as QtSignal

        class _Bridge(QObject):
            progressed = QtSignal(int, int)

        bridge = _Bridge()
        self._bridge = bridge
        pbar_box: dict[str, Any] = {}
        last = {"t": 0.0}

        def on_progress(done: int, total: int) -> None:  # main thread (queued)
            pbar = pbar_box.get("pbar")
            if pbar is None and total > 0:
                pbar = pbar_box["pbar"] = napari_progress(total=int(total), desc="Rendering (bragg_inspector)")
                self._pbar = pbar
                self._calm_activity_indicator()
            if pbar is not None:
                pbar.update(max(0, int(done) - pbar.n))
            self.render_progress.emit(int(done), int(total))

        bridge.progressed.connect(on_progress)

        def progress_cb(done, total):  # worker thread: throttle, then queue to main
            now = time.monotonic()
            if done >= total or now - last["t"] > 0.05:
                last["t"] = now
                bridge.progressed.emit(int(done), int(total))

        worker = create_worker(job, progress=progress_cb, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda res: self._render_done(res, argv, device, dtype))
        worker.errored.connect(self._render_failed)

        def finished():
            pbar = pbar_box.pop("pbar", None)
            if pbar is not None:
                pbar.close()
            self._pbar = None
            # drop our reference only now: the worker's thread is done with its signals
            self._workers.discard(worker)
            if self._worker is worker:
                self._worker = None
            if self._running and self._worker is None:  # neither returned nor errored fired
                self._running = False
                self.render_finished.emit(False)

        worker.finished.connect(finished)
        self._worker = worker
        self._workers.add(worker)
        worker.start()

    def _calm_activity_indicator(self) -> None:
        """Under software OpenGL (Xvfb/llvmpipe) every frame of napari's animated
        "in progress" GIF recomposites the whole GL window, which made renders
        about 3x slower; there the GIF is held on its first frame (the activity
        dock's progress bar still moves).  Real GPUs keep the animation."""
        try:
            if not _software_gl(self.viewer):
                return
            btn = self.viewer.window._qt_window._activity_dialog._toggleButton
            btn._inProgressIndicator.movie().setPaused(True)
        except Exception:  # private napari API: best effort only
            pass

    def cancel(self) -> None:
        """Ask the engine to stop (its should_cancel); the old image stays."""
        if self._running:
            self._cancel.set()
            self._info("cancelling…", "busy")

    def _render_failed(self, exc: BaseException) -> None:
        self._running = False
        cancelled = _engine.render_cancelled_type()
        if cancelled is not None and isinstance(exc, cancelled) or self._cancel.is_set():
            self._result = (False, "cancelled")
            self._info("render cancelled; the previous image is kept", "info")
        else:
            self._result = (False, exc)
            if not isinstance(exc, _engine.user_error_types()):
                traceback.print_exception(type(exc), exc, exc.__traceback__)
            self.report_error(exc, "Simulation failed")
        self.render_finished.emit(False)

    def _render_done(self, res, argv, device, dtype) -> None:
        sim, img, fb = res
        t0 = time.perf_counter()
        try:
            self.model.set_rendered(sim, argv, img, fb, device, dtype)
            self._show_render()
            getattr(self, "timings", {})["show_s"] = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001
            self._running = False
            self._result = (False, exc)
            self.report_error(exc, "Showing the image failed")
            self.render_finished.emit(False)
            return
        self._running = False
        self._result = (True, None)
        shape = self.model.image.shape
        kernel = getattr(self.model.sim, "last_kernel", None)
        self._info(f"rendered {shape[0]}×{shape[1]} on {device} ({dtype}"
                   + (f", {kernel}" if kernel else "") + "); click a pixel to tap it", "info")
        self.rendered.emit()
        self.render_finished.emit(True)
        self.selection_changed.emit()

    def _show_render(self) -> None:
        viewer = self.viewer
        img = self.model.image
        limits = percentile_limits(img, 0.0, self.upper_percentile)
        layer = self._layer(SIM_LAYER)
        first = layer is None
        if layer is not None and layer.data.shape != img.shape:
            viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = viewer.add_image(img, name=SIM_LAYER, colormap="gray_r", contrast_limits=limits,
                                     gamma=self.gamma, interpolation2d="nearest",
                                     metadata={"args": list(self.model.args)})
        else:
            layer.data = img
            layer.contrast_limits_range = (float(np.nanmin(img)), float(max(np.nanmax(img), limits[1])))
            layer.contrast_limits = limits
            layer.gamma = self.gamma
            layer.metadata["args"] = list(self.model.args)
        layer.visible = True
        for name in (REF_LAYER, DIFF_LAYER, RATIO_LAYER):  # stale after a new render
            if name in viewer.layers:
                viewer.layers.remove(name)
        self._refresh_points()
        self._refresh_overlay()
        if first:
            viewer.reset_view()
        viewer.layers.selection.active = layer

    def set_contrast(self, upper_percentile: float | None = None, gamma: float | None = None) -> None:
        if upper_percentile is not None:
            self.upper_percentile = float(upper_percentile)
        if gamma is not None:
            self.gamma = float(gamma)
        layer = self._layer(SIM_LAYER)
        if layer is not None and self.model.image is not None:
            layer.contrast_limits = percentile_limits(self.model.image, 0.0, self.upper_percentile)
            layer.gamma = self.gamma

    # ------------------------------------------------------------------ clicks
    def world_to_pixel(self, position) -> tuple[int, int] | None:
        layer = self._layer(SIM_LAYER)
        pos = np.asarray(position, dtype=float)
        if layer is not None:
            data = np.asarray(layer.world_to_data(pos), dtype=float)
        else:
            data = pos
        s, f = (int(np.floor(x + 0.5)) for x in data[-2:])
        shape = self.model.shape
        if shape is None or not (0 <= s < shape[0] and 0 <= f < shape[1]):
            return None
        return s, f

    def _on_mouse_drag(self, viewer, event):
        """Left click (press and release without moving) → tap; with Shift → select."""
        if getattr(event, "button", 1) not in (1, None):
            return
        press = np.asarray(event.pos, dtype=float)
        moved = False
        yield
        while event.type == "mouse_move":
            if not moved and np.hypot(*(np.asarray(event.pos, dtype=float) - press)) > DRAG_TOLERANCE_PX:
                moved = True
            yield
        if moved or event.type != "mouse_release":
            return
        if self.model.sim is None or self._layer(SIM_LAYER) is None:
            return
        pixel = self.world_to_pixel(event.position)
        if pixel is None:
            return
        self.click(*pixel, shift=_has_shift(event.modifiers))

    def click(self, slow: int, fast: int, *, shift: bool = False) -> TapRecord | None:
        """What a mouse click does: tap the pixel, fill the table, mark the
        pixel, and with shift add it to the selection.

        The table is filled first; ``last_click_ms`` records how long the
        tap, the table and the markers took (the canvas repaints afterwards)."""
        t0 = time.perf_counter()
        try:
            rec = self.model.tap(slow, fast)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.report_error(exc, "Tap failed")
            return None
        t1 = time.perf_counter()
        self.tapped.emit(rec)  # → the table
        t2 = time.perf_counter()
        if shift:
            added = self.model.select(rec)
            self.selection_changed.emit()
            note = "added to the selection" if added else "already selected"
            self._info(f"pixel ({rec.slow}, {rec.fast}) {note}; {len(self.model.selection)} selected")
        else:
            self._info(f"tapped pixel ({rec.slow}, {rec.fast})")
        self._set_points(TAP_LAYER, [rec], colour=TAP_COLOUR)
        if shift:
            self._refresh_selection_layer()
        t3 = time.perf_counter()
        self.last_click_ms = {"tap": 1e3 * (t1 - t0), "table": 1e3 * (t2 - t0), "total": 1e3 * (t3 - t0)}
        return rec

    def tap_table(self) -> list[dict]:
        rec = self.model.current
        return rec.table() if rec is not None else []

    # ------------------------------------------------------------------ points layers
    def _set_points(self, name: str, recs: Sequence[TapRecord], colour: str) -> None:
        viewer = self.viewer
        pts = np.array([[r.slow, r.fast] for r in recs], dtype=float).reshape(-1, 2)
        feats = {"hkl": [r.label for r in recs],
                 "slow": np.array([r.slow for r in recs], dtype=int),
                 "fast": np.array([r.fast for r in recs], dtype=int)}
        layer = self._layer(name)
        if layer is None:
            active = viewer.layers.selection.active
            layer = viewer.add_points(
                pts, name=name, features=feats, symbol="ring", size=self._marker_size(), face_color=colour,
                border_color=colour, border_width=0, canvas_size_limits=(14, 60), opacity=0.9,
                text={"string": "{hkl}", "color": colour, "size": 11, "anchor": "upper_left",
                      "translation": [-2, 6]},
                metadata={"tap_records": list(recs)},
            )
            if active is not None:
                viewer.layers.selection.active = active
            return
        layer.data = pts
        layer.features = feats
        layer.metadata["tap_records"] = list(recs)
        layer.refresh_text()

    def _marker_size(self) -> float:
        shape = self.model.shape or (64, 64)
        return float(max(3.0, max(shape) / 150.0))

    def _refresh_selection_layer(self) -> None:
        self._set_points(SEL_LAYER, list(self.model.selection.values()), colour=SELECTION_COLOUR)

    def _refresh_points(self) -> None:
        """Empty marker layers after a render (made now, so a click only updates them)."""
        for name, colour in ((TAP_LAYER, TAP_COLOUR), (SEL_LAYER, SELECTION_COLOUR)):
            layer = self._layer(name)
            if layer is not None:
                layer.size = self._marker_size()
            self._set_points(name, [], colour=colour)

    # ------------------------------------------------------------------ selection
    def deselect(self, pixel: tuple[int, int]) -> None:
        self.model.deselect(pixel)
        self._refresh_selection_layer()
        self.selection_changed.emit()

    def clear_selection(self) -> None:
        self.model.clear_selection()
        self._refresh_selection_layer()
        self.selection_changed.emit()

    def export(self, folder: str | Path | None = None, *, bundle_root: str | Path | None = None) -> list[Path]:
        """Write the selection (one tap JSON per pixel); [] and a message on failure."""
        try:
            paths = self.model.export(folder, bundle_root=bundle_root)
        except Exception as exc:  # noqa: BLE001
            self.report_error(exc, "Export failed")
            return []
        self._info(f"exported {len(self.model.selection)} tap(s) to {Path(paths[0]).parent}")
        self.last_export = paths
        return paths

    # ------------------------------------------------------------------ default_F overlay
    def set_overlay(self, enabled: bool) -> None:
        self.overlay_enabled = bool(enabled)
        self._refresh_overlay()

    def _refresh_overlay(self) -> None:
        viewer = self.viewer
        layer = self._layer(FALLBACK_LAYER)
        fb = self.model.fallback
        if not self.overlay_enabled or fb is None:
            if layer is not None:
                viewer.layers.remove(layer)
            if self.overlay_enabled and fb is None and self.model.sim is not None:
                self._info("the engine gave no fallback map for this render", "error")
            self.overlay_changed.emit()
            return
        from napari.utils.colormaps import DirectLabelColormap

        colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        for code in fb.reasons:
            if code:
                colours[code] = REASON_STYLE.get(code, ("", "#ffffff"))[1]
        cmap = DirectLabelColormap(color_dict=colours)
        if layer is not None and layer.data.shape != fb.reason.shape:
            viewer.layers.remove(layer)
            layer = None
        if layer is None:
            active = viewer.layers.selection.active
            layer = viewer.add_labels(fb.reason, name=FALLBACK_LAYER, opacity=0.45, colormap=cmap,
                                      metadata={"reasons": dict(fb.reasons)})
            if active is not None:
                viewer.layers.selection.active = active
            # keep the tap / selection markers on top
            for name in (TAP_LAYER, SEL_LAYER):
                if name in viewer.layers:
                    viewer.layers.move(viewer.layers.index(name), len(viewer.layers))
        else:
            layer.data = fb.reason
            layer.colormap = cmap
        self.overlay_changed.emit()

    # ------------------------------------------------------------------ compare
    def open_reference(self, path: str | Path) -> Comparison | None:
        """Reference image as a layer plus difference and ratio; metrics in the panel."""
        try:
            cmp = self.model.compare(path)
        except Exception as exc:  # noqa: BLE001
            self.report_error(exc, "Reference image")
            return None
        viewer = self.viewer
        sim_layer = self._layer(SIM_LAYER)
        limits = tuple(sim_layer.contrast_limits) if sim_layer is not None else percentile_limits(cmp.reference)
        dmax = float(np.nanmax(np.abs(cmp.difference))) or 1.0
        finite = cmp.ratio[np.isfinite(cmp.ratio)]
        rlim = percentile_limits(finite, 1.0, 99.0) if finite.size else (0.0, 2.0)
        specs = [
            (REF_LAYER, cmp.reference, dict(colormap="gray_r", contrast_limits=limits, gamma=self.gamma, visible=False)),
            (DIFF_LAYER, cmp.difference, dict(colormap="bwr", contrast_limits=(-dmax, dmax), visible=False)),
            (RATIO_LAYER, cmp.ratio, dict(colormap="viridis", contrast_limits=rlim, visible=False)),
        ]
        active = viewer.layers.selection.active
        for name, data, kw in specs:
            if name in viewer.layers:
                viewer.layers.remove(name)
            viewer.add_image(data, name=name, interpolation2d="nearest", metadata={"path": str(path)}, **kw)
        for name in (FALLBACK_LAYER, TAP_LAYER, SEL_LAYER):  # overlays stay on top
            if name in viewer.layers:
                viewer.layers.move(viewer.layers.index(name), len(viewer.layers))
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active
        m = cmp.metrics
        self._info(f"compared with {Path(path).name}: correlation {m.get('correlation', float('nan')):.6f}")
        self.compared.emit(cmp)
        return cmp

    def flip(self) -> str | None:
        """Show the simulated image or the reference, never both."""
        sim, ref = self._layer(SIM_LAYER), self._layer(REF_LAYER)
        if sim is None or ref is None:
            self._info("open a reference image to flip between the two", "info")
            return None
        show_ref = sim.visible
        sim.visible, ref.visible = (not show_ref), show_ref
        shown = REF_LAYER if show_ref else SIM_LAYER
        self._info(f"showing the {shown} image ({FLIP_KEY} flips)")
        return shown

    def _on_flip_key(self, viewer=None):
        self.flip()

    def describe_args(self) -> str:
        return join_args(self.model.args)


def tap_doc(rec: TapRecord) -> dict:
    try:
        return rec.tap.to_json()
    except Exception:  # pragma: no cover - engine without to_json
        return {"pixel": {"slow": rec.slow, "fast": rec.fast}, "rows": rec.rows, "summary": rec.summary}


_SOFTWARE_GL: dict[int, bool] = {}


def _software_gl(viewer) -> bool:
    """True when the viewer's canvas renders with a software OpenGL (llvmpipe…)."""
    key = id(viewer)
    if key not in _SOFTWARE_GL:
        renderer = ""
        try:
            canvas = viewer.window._qt_viewer.canvas._scene_canvas
            canvas.set_current()
            from vispy.gloo import gl

            renderer = str(gl.glGetParameter(gl.GL_RENDERER)).lower()
        except Exception:
            pass
        _SOFTWARE_GL[key] = any(w in renderer for w in ("llvmpipe", "softpipe", "swrast", "software"))
    return _SOFTWARE_GL[key]


_CONTROLLERS: dict[int, tuple[weakref.ref, InspectorController]] = {}


def controller_for(viewer, cwd: str | None = None) -> InspectorController:
    """The controller of this viewer (made on first use), shared by all panels."""
    key = id(viewer)
    entry = _CONTROLLERS.get(key)
    if entry is not None and entry[0]() is viewer:
        return entry[1]
    ctrl = InspectorController(viewer, cwd=cwd)
    _CONTROLLERS[key] = (weakref.ref(viewer, lambda _r, k=key: _CONTROLLERS.pop(k, None)), ctrl)
    return ctrl
