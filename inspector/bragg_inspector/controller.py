"""Connects the Qt-free :class:`~bragg_inspector.model.InspectorModel` to a
napari viewer: layers, the click callback, the hover readout, key bindings and
the render job.

No widgets and no Qt here: panels subscribe to the psygnal signals below and
call the public methods; the render runs through a *runner*
(:mod:`bragg_inspector._qt.worker` in a Qt application, in the caller's thread
otherwise).
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
from .io import header_geometry_args
from .model import REASON_COLOURS, Comparison, InspectorModel, ReferenceShapeError, TapRecord, percentile_limits
from .readout import spread_labels

__all__ = ["SIM_LAYER", "KEYS", "KEY_HELP", "DEFAULT_F_CMP_STYLE", "InspectorController", "tap_doc", "controller_for"]

SIM_LAYER = "simulated"
TAP_LAYER = "tap"
SEL_LAYER = "selection"
FALLBACK_LAYER = "default_F regions"
REF_LAYER = "reference"
DIFF_LAYER = "difference (sim − ref)"
RATIO_LAYER = "ratio (sim / ref)"
OVER_TOL_LAYER = "over tolerance"
OVER_TOL_COLOUR = "#212121"  # outlines on the red/blue difference
#: layers of an intensity comparison (removed together)
COMPARISON_LAYERS = (REF_LAYER, DIFF_LAYER, RATIO_LAYER, OVER_TOL_LAYER)
BEAM_LAYER = "beam centre"
RINGS_LAYER = "resolution rings"
RING_LABELS_LAYER = "ring labels"
BOX_LAYER = "HKL table box"
DEFAULT_F_CMP_LAYER = "default_F comparison"
#: colours and legend of the default_F comparison labels (torchbragg.defaultf_map.fallback_labels)
DEFAULT_F_CMP_STYLE = {
    1: ("default_F in both, same reason", "#ffb300"),
    2: ("only in the current run", "#e6194b"),
    3: ("only in the reference", "#2979ff"),
    4: ("in both, another reason", "#9c27b0"),
}
#: layers that stay above every image
MARKER_LAYERS = (BOX_LAYER, RINGS_LAYER, RING_LABELS_LAYER, BEAM_LAYER, SEL_LAYER, TAP_LAYER)

#: key bindings of the viewer (napari's key names)
KEYS = {"flip": "Shift-F", "overlay": "Shift-D", "rings": "Shift-R", "clear": "Shift-X", "export": "Shift-E"}
KEY_HELP = (f"{KEYS['overlay']}: default_F regions on/off · {KEYS['rings']}: resolution rings on/off · "
            f"{KEYS['flip']}: difference → reference → simulated · {KEYS['clear']}: clear the selection · "
            f"{KEYS['export']}: export the selection as a new evidence bundle")
TAP_COLOUR = "#00c853"        # green: readable on the white background, the pink and the blue overlay
SELECTION_COLOUR = "#aa00ff"  # purple
BEAM_COLOUR = "#00b8d4"
RING_COLOUR = "#2962ff"
BOX_COLOUR = "#d50000"
MARKER_SCREEN_PX = 22     # tap/selection rings: this many screen pixels at any zoom
LABEL_SEPARATION_PX = 70  # selection labels closer than this on screen are hidden (earlier ones win)
FIRST_PICTURE_DRAW_MS = 150  # the first picture's draw before the worker starts (launcher)
DRAG_TOLERANCE_PX = 4.0   # press→release movement (screen px) that still counts as a click


def _has_shift(modifiers) -> bool:
    return any(getattr(m, "name", m) == "Shift" for m in (modifiers or ()))


class SyncRunner:
    """Runs a render job in the caller's thread (no Qt application)."""

    def start(self, job, on_progress, on_done, on_error) -> None:
        try:
            res = job(on_progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the controller
            on_error(exc)
        else:
            on_done(res)

    def wait(self, timeout, cancel) -> None:  # the job has finished when start returns
        return None


class InspectorController:
    """One per viewer (see :func:`controller_for`).

    Binds the viewer's keys (:data:`KEYS`), its mouse-drag callback (click → tap) and
    zoom and layer-insertion events.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer (held by a weak reference).
    cwd : str, optional
        Folder that relative paths in the arguments and default exports use.
    runner : object, optional
        Runs the render job: ``start(job, on_progress, on_done, on_error)`` and ``wait(timeout, cancel)``
        (default: :class:`SyncRunner`, in the caller's thread).

    Attributes
    ----------
    model : InspectorModel
        The Qt-free state.
    overlay_enabled, rings_enabled : bool
        Whether the default_F regions and the resolution rings are shown.
    ring_spacings : list of float or None
        d-spacings of the rings in Å; None: the detector's defaults.
    upper_percentile, gamma : float
        Contrast of the simulated image.
    last_error : str or None
        The last error message (cleared by the next non-error message).
    last_message : str
        The last status message.
    last_click_ms : dict of str to float
        ``tap``, ``table`` and ``total`` milliseconds of the last click.
    last_export : list of Path
        Files of the last successful export.
    first_picture_shown : bool
        A rendered image has been on screen.
    last_fit : torchbragg.fit.FitResult or None
        The last fit to the reference image (see :meth:`fit_reference`).
    detached : bool
        The viewer's window has closed (:meth:`detach`).
    """

    status = Signal(str, str)            # message, level ("info" | "busy" | "error")
    args_changed = Signal(object)        # list[str]
    render_started = Signal()
    render_progress = Signal(int, int)   # done rows, total rows
    render_finished = Signal(bool)       # True when a new image is shown
    rendered = Signal()                  # model.image / hkl_info / fallback are new
    tapped = Signal(object)              # TapRecord
    selection_changed = Signal()
    overlay_changed = Signal()
    rings_changed = Signal()
    compared = Signal(object)            # Comparison
    pinned_changed = Signal()
    default_F_compared = Signal(object)  # counts dict, or None when cleared
    first_picture = Signal()             # the first rendered image is on screen (once)
    sensitivity_started = Signal(object)  # TapRecord whose sensitivity tap is being computed
    sensitivity_ready = Signal(object)    # TapRecord, its ``sensitivity`` filled
    sensitivity_failed = Signal(object, str)  # TapRecord, message
    fit_started = Signal()
    fit_progress = Signal(int, int)      # loss evaluations done, most evaluations
    fit_finished = Signal(object)        # torchbragg.fit.FitResult, or None when it failed or was cancelled

    def __init__(self, viewer, cwd: str | None = None, runner=None):
        self._viewer_ref = weakref.ref(viewer)
        self.model = InspectorModel(cwd=cwd)
        self.runner = runner or SyncRunner()
        self.overlay_enabled = False
        self.rings_enabled = False
        self.ring_spacings: list[float] | None = None  # None: the detector's defaults
        self.upper_percentile = 99.9
        self.gamma = 1.0
        self.last_error: str | None = None
        #: the viewer's window has closed (:meth:`detach`): nothing is shown or reported any more
        self.detached = False
        self.timings: dict[str, float] = {}
        self.last_click_ms: dict[str, float] = {}  # tap / table (click → table filled) / total
        self.last_message: str = ""
        self.last_export: list[Path] = []
        self._cancel = threading.Event()
        self._running = False
        self._result: tuple[bool, Any] | None = None
        self._header_sim = None  # geometry of an opened SMV image when nothing is rendered
        self.first_picture_shown = False  # a rendered image is on screen (the launcher's timing)
        self._sensitivity_jobs: set[tuple[int, int, int]] = set()  # (id(sim), slow, fast) being computed
        self.last_sensitivity_s: float | None = None
        self.last_fit = None
        viewer.mouse_drag_callbacks.append(self._on_mouse_drag)
        for name, fn in (("flip", self.flip), ("overlay", self.toggle_overlay), ("rings", self.toggle_rings),
                         ("clear", self.clear_selection), ("export", self._export_key)):
            viewer.bind_key(KEYS[name], lambda _v=None, fn=fn: fn(), overwrite=True)
        viewer.scene.camera.events.zoom.connect(self._on_zoom)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)

    # ------------------------------------------------------------------ basics
    @property
    def viewer(self):
        """The viewer (``RuntimeError`` once it is gone)."""
        v = self._viewer_ref()
        if v is None:
            raise RuntimeError("the viewer is gone")
        return v

    @property
    def running(self) -> bool:
        """True while a render runs."""
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
        """A clear message in the panel's status line and as a napari notification.

        Parameters
        ----------
        exc : BaseException or str
            The error; exceptions that are not user errors are shown with their type name.
        context : str
            Prefix of the message (``"<context>: <text>"``), e.g. ``"Export failed"``.

        Returns
        -------
        str
            The message, also kept as :attr:`last_error`.
        """
        if isinstance(exc, BaseException):
            text = str(exc) or type(exc).__name__
            if not isinstance(exc, _engine.user_error_types()):
                text = f"{type(exc).__name__}: {text}"
        else:
            text = str(exc)
        msg = f"{context}: {text}" if context else text
        self.last_error = msg
        self.last_message = msg
        if self.detached:  # the window is gone: a job that ended with it is nobody's error
            return msg
        self.status.emit(msg, "error")
        try:
            from napari.utils.notifications import show_error

            show_error(msg)
        except Exception:  # pragma: no cover - notification machinery unavailable
            pass
        return msg

    # ------------------------------------------------------------------ arguments
    def set_args(self, args: str | Sequence[str]) -> list[str]:
        """Replace the model's arguments (``args_changed`` is emitted).

        Parameters
        ----------
        args : str or sequence of str
            An argument line or the split arguments.

        Returns
        -------
        list of str
            The new arguments.

        Raises
        ------
        ValueError
            An argument line with unbalanced quotes.
        """
        self.model.args = split_args(args)
        self.args_changed.emit(list(self.model.args))
        return self.model.args

    def set_hkl(self, path: str | None, args: str | Sequence[str] | None = None) -> list[str]:
        """Add or replace ``-hkl PATH`` (``None`` removes it).

        Parameters
        ----------
        path : str or None
            The HKL file; None or ``""`` removes ``-hkl``.
        args : str or sequence of str, optional
            The arguments to change (default: the model's).

        Returns
        -------
        list of str
            The new arguments (set as the model's).

        Raises
        ------
        ValueError
            An argument line with unbalanced quotes.
        """
        base = self.model.args if args is None else split_args(args)
        return self.set_args(set_flag_value(base, "-hkl", None if not path else str(path)))

    @staticmethod
    def hkl_of(args: Sequence[str]) -> str | None:
        """The ``-hkl`` file of the arguments.

        Parameters
        ----------
        args : sequence of str
            nanoBragg arguments.

        Returns
        -------
        str or None
            The value after the last ``-hkl``; None without one.
        """
        return get_flag_value(args, "-hkl")

    # ------------------------------------------------------------------ rendering
    def simulate(self, args: str | Sequence[str] | None = None, *, device: str | None = None,
                 dtype: str | None = None, wait: bool = False, timeout: float | None = None) -> bool:
        """Render in the runner; the layers are replaced only when it succeeds.

        Returns True once started (``wait=False``) or when a new image is shown
        (``wait=True``); False on bad input (shown as a message).

        Parameters
        ----------
        args : str or sequence of str, optional
            An argument line or the split arguments; None renders the model's.
        device, dtype : str, optional
            Default: the model's.
        wait : bool
            Block until the render ends.
        timeout : float, optional
            With ``wait``: seconds after which the render is cancelled.

        Returns
        -------
        bool
            As above; also False when a render is already running.
        """
        if self.detached:
            return False
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
        self.args_changed.emit(list(argv))

        cancel = self._cancel = threading.Event()
        self._running = True
        self._result = None
        self.render_started.emit()
        self._info(f"rendering on {device} ({dtype})…", "busy")
        model = self.model
        timings = self.timings = {}

        def job(progress=None):
            t0 = time.perf_counter()
            sim = model.prepare(argv, device, dtype)
            t1 = time.perf_counter()
            img, fb = _engine.render(sim, progress=progress, should_cancel=cancel.is_set)
            timings.update(setup_s=t1 - t0, render_s=time.perf_counter() - t1)
            return sim, img, fb

        self.runner.start(job, self._progress,
                          lambda res: self._render_done(res, argv, device, dtype), self._render_failed)
        if wait:
            self.runner.wait(timeout, self.cancel)
            return bool(self._result and self._result[0])
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the render ends (the event loop keeps running); after
        ``timeout`` seconds the render is cancelled.

        Parameters
        ----------
        timeout : float, optional
            Seconds before the render is cancelled; None waits without limit.
        """
        if self._running:
            self.runner.wait(timeout, self.cancel)

    def adopt_prerender(self, pre, args: Sequence[str], device: str, dtype: str, poll_ms: int = 20) -> None:
        """Show a render made by a :class:`~bragg_inspector.prerender.Prerender` child as
        soon as it is ready, then build this process's simulation of the same arguments
        in the runner and adopt the image (as a finished render).  A failed child
        falls back to :meth:`simulate`, which reports the error.

        Parameters
        ----------
        pre : Prerender
            The child process's render.
        args : sequence of str
            Its nanoBragg arguments.
        device, dtype : str
            Its device and dtype.
        poll_ms : int
            Milliseconds between two looks at the child.
        """
        from qtpy.QtCore import QTimer  # only the launcher, in a Qt application, uses this

        argv = list(args)
        self.args_changed.emit(argv)
        self._running = True
        self.render_started.emit()
        self._info(f"rendering on {device} ({dtype})…", "busy")
        timer = QTimer()
        timer.setInterval(poll_ms)
        self._prerender_timer = timer

        def check():
            state = pre.poll()
            if state is None:
                return
            timer.stop()
            self._running = False
            if self.detached:
                pre.close()
                return
            if not state:
                pre.close()
                self.simulate(argv, device=device, dtype=dtype)
                return
            img = pre.image()  # the picture first; the fallback map is read in the worker
            self._show_first_picture(img)
            self._running = True
            model = self.model

            def job(progress=None):
                try:
                    fb, kernel, note = pre.fallback(), pre.kernel(), pre.kernel_note()
                finally:
                    pre.close()
                sim = model.prepare(argv, device, dtype)
                if sim.last_kernel is None:  # the image came from the child: its kernel is the record's
                    sim.last_kernel, sim.last_kernel_note = kernel, note
                return sim, img, fb

            def start():
                self.runner.start(job, self._progress, lambda res: self._render_done(res, argv, device, dtype),
                                  self._render_failed)

            # the worker imports torch, which holds the interpreter for a second: let Qt draw the picture first
            QTimer.singleShot(FIRST_PICTURE_DRAW_MS, start)

        timer.timeout.connect(check)
        timer.start()
        check()  # the child is often done by the time the window exists

    def _mark_first_picture(self) -> None:
        if not self.first_picture_shown:
            self.first_picture_shown = True
            self.first_picture.emit()

    def _show_first_picture(self, img: np.ndarray) -> None:
        """The image alone, before the simulation object exists (no taps yet)."""
        viewer = self.viewer
        self._mark_first_picture()
        limits = percentile_limits(img, 0.0, self.upper_percentile)
        layer = self._layer(SIM_LAYER)
        if layer is not None and layer.metadata.get("placeholder"):
            layer.data = img
            layer.contrast_limits_range = (float(np.nanmin(img)), float(max(np.nanmax(img), limits[1])))
            layer.contrast_limits = limits
            layer.gamma = self.gamma
            viewer.reset_view()
            return
        if layer is not None:
            return
        viewer.add_image(img, name=SIM_LAYER, colormap="gray_r", gamma=self.gamma, interpolation2d="nearest",
                         contrast_limits=limits, metadata={"args": list(self.model.args)})
        viewer.reset_view()

    # ------------------------------------------------------------------ fit
    def fit_reference(self, params: str, args: str | Sequence[str] | None = None, *, device: str | None = None,
                      dtype: str = "float64", max_iter: int = 60, loss: str = "lsq",
                      region: str | Sequence[int] | None = None, wait: bool = False,
                      timeout: float | None = None) -> bool:
        """Fit parameters of the simulation to the reference image in the runner (the engine's
        ``fit_reference``); :attr:`fit_finished` fires with the result (None when it failed or was
        cancelled, see :meth:`cancel`).  The image shown and the arguments stay as they are.

        Parameters
        ----------
        params : str
            Comma-separated fittable parameter families, e.g. ``"distance,beam_center,misset"``.
        args : str or sequence of str, optional
            Starting arguments (an argument line or the split arguments); None: the model's.
        device : str, optional
            Default: the model's.
        dtype : str
            ``"float64"`` (default) or ``"float32"``.
        max_iter : int
            Most loss evaluations of the optimiser.
        loss : str
            ``"lsq"`` (default) or ``"poisson"``.
        region : str or sequence of int, optional
            Pixels compared, ``xmin xmax ymin ymax`` (fast and slow, inclusive, as ``-roi``); None or
            blank: the whole image.
        wait : bool
            Block (the event loop keeps running) until the fit ends.
        timeout : float, optional
            With ``wait``: seconds after which the fit is cancelled.

        Returns
        -------
        bool
            True once started (``wait=False``) or when it succeeded (``wait=True``); False when there is
            no reference image, the arguments are bad or something already runs (shown as a message).
        """
        if self.detached:
            return False
        if self._running:
            self._info("a render or fit is already running: cancel it first", "error")
            return False
        cmp = self.model.comparison
        if cmp is None:
            self.report_error("open a reference image of the simulation's size first", "Fit to reference")
            return False
        try:
            argv = split_args(args) if args is not None else list(self.model.args)
        except ValueError as exc:
            self.report_error(exc, "Bad argument line")
            return False
        roi = None
        if isinstance(region, str):
            region = region.replace(",", " ").split()
        if region is not None and len(region) > 0:
            try:
                roi = [int(str(v)) for v in region]  # whole numbers only: "1.5" and 1.5 are refused
            except ValueError:
                roi = []
            ny, nx = cmp.reference.shape
            if len(roi) != 4 or not (0 <= roi[0] <= roi[1] < nx and 0 <= roi[2] <= roi[3] < ny):
                self.report_error(f"the region must be four integers xmin xmax ymin ymax inside 0..{nx - 1} and "
                                  f"0..{ny - 1}, not {' '.join(str(v) for v in region)!r}", "Fit to reference")
                return False
        if loss not in ("lsq", "poisson"):
            self.report_error(f"loss must be lsq or poisson, not {loss!r}", "Fit to reference")
            return False
        device = device or self.model.device
        reference, cwd = cmp.reference, self.model.cwd
        cancel = self._cancel = threading.Event()
        self._running = True
        self._result = None
        self.last_fit = None
        self.fit_started.emit()
        self._info(f"fitting {params} to {Path(cmp.path).name} on {device} ({dtype})…", "busy")

        def job(progress=None):
            return _engine.fit_reference(argv, reference, params, device=device, dtype=dtype, cwd=cwd,
                                         max_iter=max_iter, loss=loss, roi=roi, progress=progress,
                                         should_cancel=cancel.is_set)

        def done(res):
            self._running = False
            self._result = (True, None)
            self.last_fit = res
            if self.detached:
                return
            after = res.metrics_after
            self._info(f"fitted {params}: rmsd {res.metrics_before['rmsd']:.4g} → {after['rmsd']:.4g} photons "
                       f"in {res.iterations} evaluations; 'Use fitted arguments' puts them in the argument line")
            self.fit_finished.emit(res)

        def failed(exc):
            self._job_failed(exc, cancel, "fit cancelled; the arguments are unchanged", "Fit failed")
            self.fit_finished.emit(None)

        self.runner.start(job, lambda d, t: self.fit_progress.emit(int(d), int(t)), done, failed)
        if wait:
            self.runner.wait(timeout, self.cancel)
            return bool(self._result and self._result[0])
        return True

    def use_fitted_args(self) -> list[str] | None:
        """Put the last fit's arguments in the argument line (:meth:`set_args`; nothing is rendered).

        Returns
        -------
        list of str or None
            The fitted arguments; None when there is no fit.
        """
        if self.last_fit is None:
            self.report_error("no fit yet", "Use fitted arguments")
            return None
        return self.set_args(list(self.last_fit.fitted_args))

    def _progress(self, done: int, total: int) -> None:
        self.render_progress.emit(int(done), int(total))

    def detach(self) -> None:
        """The viewer is closing: stop a running render or fit and disconnect every listener of the
        controller's signals (the panels go with the window; a job still finishing in its thread then
        reaches nobody)."""
        self.detached = True
        self.cancel()
        for name, attr in vars(type(self)).items():
            if isinstance(attr, Signal):
                getattr(self, name).disconnect()

    def cancel(self) -> None:
        """Ask the engine to stop (its should_cancel); the old image stays."""
        if self._running:
            self._cancel.set()
            self._info("cancelling…", "busy")

    def _job_failed(self, exc: BaseException, cancel: threading.Event, cancelled: str, context: str) -> None:
        """A render or fit job ended without a result: record it, and say it was cancelled (``cancelled``)
        or report the error under ``context`` (with its traceback on the console when it is a bug)."""
        self._running = False
        if isinstance(exc, _engine.render_cancelled_type()) or cancel.is_set():
            self._result = (False, "cancelled")
            self._info(cancelled, "info")
        else:
            self._result = (False, exc)
            if not isinstance(exc, _engine.user_error_types()):
                traceback.print_exception(type(exc), exc, exc.__traceback__)
            self.report_error(exc, context)

    def _render_failed(self, exc: BaseException) -> None:
        self._job_failed(exc, self._cancel, "render cancelled; the previous image is kept", "Simulation failed")
        self.render_finished.emit(False)

    def _render_done(self, res, argv, device, dtype) -> None:
        if self.detached:  # the window closed while it ran: nothing to show it in
            self._running = False
            self._result = (False, "cancelled")
            return
        sim, img, fb = res
        t0 = time.perf_counter()
        old_shape = self.model.shape
        try:
            self.model.set_rendered(sim, argv, img, fb, device, dtype)
            kept, dropped = self.model.retap_selection()
            self._show_render(refit=old_shape != self.model.shape)
            self.timings["show_s"] = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001
            self._running = False
            self._result = (False, exc)
            self.report_error(exc, "Showing the image failed")
            self.render_finished.emit(False)
            return
        self._running = False
        self._result = (True, None)
        shape = self.model.image.shape
        msg = (f"rendered {shape[0]}×{shape[1]} on {device} ({dtype}, {sim.last_kernel}); "
               "click a pixel to tap it")
        if kept or dropped:
            msg += f"; selection re-tapped on the new image: {kept} pixel(s)"
            if dropped:
                msg += f", {dropped} dropped (outside the new detector)"
        if self.model.uses_default_F_everywhere:
            msg += f"; no HKL table: every evaluation uses default_F = {self.model.hkl_info.get('default_F')}"
        note = getattr(sim, "last_kernel_note", None)
        if note:  # no C++ compiler (or a failed build): say so, with what to do, in the same line
            msg = f"{note}; {msg}"
        self._info(msg, "warning" if note else "info")
        self.rendered.emit()
        self.render_finished.emit(True)
        self.selection_changed.emit()

    def _show_render(self, refit: bool) -> None:
        viewer = self.viewer
        img = self.model.image
        limits = percentile_limits(img, 0.0, self.upper_percentile)
        layer = self._layer(SIM_LAYER)
        if layer is not None and layer.data.shape != img.shape:
            viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = viewer.add_image(img, name=SIM_LAYER, colormap="gray_r", contrast_limits=limits,
                                     gamma=self.gamma, interpolation2d="nearest",
                                     metadata={"args": list(self.model.args)})
            self._install_hover(layer)
            refit = True
        else:
            layer.data = img
            layer.contrast_limits_range = (float(np.nanmin(img)), float(max(np.nanmax(img), limits[1])))
            layer.contrast_limits = limits
            layer.gamma = self.gamma
            layer.metadata["args"] = list(self.model.args)
            layer.metadata.pop("placeholder", None)
            self._install_hover(layer)  # a layer made elsewhere (the sample's placeholder)
        layer.visible = True
        self._mark_first_picture()
        self._header_sim = None
        self._refresh_points()
        self._refresh_overlay()
        self._refresh_default_F_comparison(recompute=True)
        self._refresh_comparison()
        self._refresh_geometry()
        self._raise_markers()
        if refit:
            viewer.reset_view()
        self._on_zoom()
        viewer.layers.selection.active = layer

    def set_contrast(self, upper_percentile: float | None = None, gamma: float | None = None) -> None:
        """Contrast of the simulated image: limits from the 0th to ``upper_percentile`` percentile, and gamma.

        Parameters
        ----------
        upper_percentile : float, optional
            Upper percentile of the contrast limits (None keeps the current one).
        gamma : float, optional
            The layer's gamma (None keeps the current one).
        """
        if upper_percentile is not None:
            self.upper_percentile = float(upper_percentile)
        if gamma is not None:
            self.gamma = float(gamma)
        layer = self._layer(SIM_LAYER)
        if layer is not None and self.model.image is not None:
            layer.contrast_limits = percentile_limits(self.model.image, 0.0, self.upper_percentile)
            layer.gamma = self.gamma

    # ------------------------------------------------------------------ hover
    def hover(self, slow: int, fast: int) -> str:
        """The status-bar text for pixel (slow, fast): what a mouse move shows.

        Without a render, an opened SMV image's header geometry is used (no hkl, no F).

        Parameters
        ----------
        slow, fast : int
            The pixel.

        Returns
        -------
        str
            The readout.

        Raises
        ------
        ValueError
            Nothing rendered or opened, or the pixel is outside the image.
        """
        if self.model.sim is not None:
            return self.model.hover(slow, fast)
        if self._header_sim is not None:
            sim, layer = self._header_sim
            ny, nx = layer.data.shape[-2:]
            if 0 <= slow < ny and 0 <= fast < nx:
                from .readout import hover_text

                geo = _engine.pixel_geometry(sim, slow, fast)
                return hover_text(slow, fast, value=float(layer.data[slow, fast]), geometry=geo,
                                  f_value=None, f_reason=None, with_hkl=False)
        raise ValueError("nothing rendered yet: run a simulation first")

    def _install_hover(self, layer) -> None:
        """Make the layer's status (napari's status bar on mouse moves) the hover readout."""
        if getattr(layer, "_bragg_hover", False):
            return
        original = layer.get_status

        def get_status(position=None, *args, **kwargs):
            status = original(position, *args, **kwargs)
            if position is not None:
                px = self.world_to_pixel(position, clip=False)
                if px is not None:
                    try:
                        status["coordinates"] = self.hover(*px)
                    except ValueError:
                        pass
            return status

        layer.get_status = get_status
        layer._bragg_hover = True

    # ------------------------------------------------------------------ clicks
    def world_to_pixel(self, position, clip: bool = True) -> tuple[int, int] | None:
        """The image pixel under a world position (through the simulated layer's transform).

        Parameters
        ----------
        position : array_like of float
            napari world coordinates (the last two are slow, fast).
        clip : bool
            Not used: positions outside the image always give None.

        Returns
        -------
        (int, int) or None
            (slow, fast) of the nearest pixel centre; None outside the image or with nothing shown.
        """
        layer = self._layer(SIM_LAYER)
        pos = np.asarray(position, dtype=float)
        data = np.asarray(layer.world_to_data(pos), dtype=float) if layer is not None else pos
        s, f = (int(np.floor(x + 0.5)) for x in data[-2:])
        shape = self.model.shape
        if shape is None:
            if self._header_sim is not None:
                shape = self._header_sim[1].data.shape[-2:]
            else:
                return None
        if not (0 <= s < shape[0] and 0 <= f < shape[1]):
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
        stored = self._stored_tap_at(event.position)
        if stored is not None:
            self.show_record(stored)
            return
        if self.model.sim is None or self._layer(SIM_LAYER) is None:
            return
        pixel = self.world_to_pixel(event.position)
        if pixel is None:
            return
        self.click(*pixel, shift=_has_shift(event.modifiers))

    def _stored_tap_at(self, position) -> TapRecord | None:
        """A tap read from a tap JSON file at this position: shown when nothing is
        rendered, or when its layer is the active one."""
        viewer = self.viewer
        active = viewer.layers.selection.active
        for layer in list(viewer.layers)[::-1]:
            docs = (getattr(layer, "metadata", None) or {}).get("tap_documents")
            if not docs or not layer.visible:
                continue
            if self.model.sim is not None and layer is not active:
                continue
            data = np.asarray(layer.world_to_data(np.asarray(position, dtype=float)), dtype=float)[-2:]
            s, f = (int(np.floor(x + 0.5)) for x in data)
            for doc in docs:
                rec = TapRecord.from_document(doc, source=f"tap JSON ({layer.name})")
                if rec.pixel == (s, f):
                    return rec
        return None

    def show_record(self, rec: TapRecord) -> None:
        """Show a record's table (a stored tap or a selected pixel) and mark it.

        Parameters
        ----------
        rec : TapRecord
            The record; it becomes the model's :attr:`~InspectorModel.current`.
        """
        self.model.current = rec
        self.tapped.emit(rec)
        where = "stored in a tap JSON file" if rec.source != "engine" else "tapped"
        self._info(f"pixel ({rec.slow}, {rec.fast}): table {where}")
        if self.model.sim is not None:
            self._set_points(TAP_LAYER, [rec], colour=TAP_COLOUR)

    def click(self, slow: int, fast: int, *, shift: bool = False) -> TapRecord | None:
        """What a mouse click does: tap the pixel, fill the table, mark the
        pixel, and with shift add it to the selection.

        The table is filled first; ``last_click_ms`` records how long the
        tap, the table and the markers took (the canvas repaints afterwards).

        Parameters
        ----------
        slow, fast : int
            The pixel.
        shift : bool
            Also add the pixel to the selection.

        Returns
        -------
        TapRecord or None
            The tap; None when it failed (the message shown).
        """
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
        """Rows of the shown pixel's table (:meth:`TapRecord.table`).

        Returns
        -------
        list of dict
            The rows; empty when no pixel is shown.
        """
        rec = self.model.current
        return rec.table() if rec is not None else []

    # ------------------------------------------------------------------ sensitivity tap
    @property
    def sensitivity_running(self) -> bool:
        """True while a ``sensitivity`` tap is being computed."""
        return bool(self._sensitivity_jobs)

    def compute_sensitivity(self, rec: TapRecord | None = None, *, wait: bool = False,
                            timeout: float | None = None) -> bool:
        """Compute the engine's ``sensitivity`` tap (dI/dp) of a pixel in the runner (a worker thread
        in Qt); :attr:`sensitivity_ready` fires with the record when it is there.

        Parameters
        ----------
        rec : TapRecord, optional
            The engine tap of the pixel (default: the shown one).
        wait : bool
            Block (the event loop keeps running) until it is computed.
        timeout : float, optional
            With ``wait``: seconds to wait at most.

        Returns
        -------
        bool
            True when it was started or is already there; False when there is no engine tap to compute it for.
        """
        rec = rec if rec is not None else self.model.current
        if rec is None or rec.source != "engine" or self.model.sim is None:
            return False
        if rec.sensitivity is not None:
            self.sensitivity_ready.emit(rec)
            return True
        sim, model = self.model.sim, self.model
        key = (id(sim), rec.slow, rec.fast)
        if key not in self._sensitivity_jobs:
            self._sensitivity_jobs.add(key)
            self.sensitivity_started.emit(rec)
            self._info(f"computing dI/dp of pixel ({rec.slow}, {rec.fast})…", "busy")
            t0 = time.perf_counter()

            def job(progress=None):
                return model.sensitivity(sim, rec.slow, rec.fast)

            def done(values):
                self._sensitivity_jobs.discard(key)
                if model.sim is not sim:  # a new render replaced the simulation meanwhile
                    return
                self.last_sensitivity_s = time.perf_counter() - t0
                model.attach_sensitivity(rec, values)
                self._info(f"dI/dp of pixel ({rec.slow}, {rec.fast}): {len(values['parameters'])} parameter "
                           f"component(s) in {self.last_sensitivity_s:.2g} s")
                self.sensitivity_ready.emit(rec)

            def failed(exc):
                self._sensitivity_jobs.discard(key)
                msg = self.report_error(exc, "Sensitivity failed")
                self.sensitivity_failed.emit(rec, msg)

            self.runner.start(job, lambda *_: None, done, failed)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            while key in self._sensitivity_jobs and (deadline is None or time.monotonic() < deadline):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.runner.wait(left, lambda: None)
        return True

    def jump_to(self, pixel: tuple[int, int], visible_pixels: int = 48) -> TapRecord | None:
        """Centre the view on a selected pixel, zoom so that about
        ``visible_pixels`` image pixels span the canvas, and show its table.

        Parameters
        ----------
        pixel : (int, int)
            (slow, fast).
        visible_pixels : int
            Image pixels across the canvas's shorter side (the zoom is at least 1).

        Returns
        -------
        TapRecord or None
            The selection's record of the pixel; None when it is not selected (the view still moves).
        """
        viewer = self.viewer
        s, f = (int(x) for x in pixel)
        c = list(viewer.scene.camera.center)
        c[-2:] = [float(s), float(f)]
        viewer.scene.camera.center = tuple(c)
        width = min(viewer.canvas.size)
        viewer.scene.camera.zoom = max(1.0, float(width) / visible_pixels)
        rec = self.model.selection.get((s, f))
        if rec is not None:
            self.show_record(rec)
        return rec

    # ------------------------------------------------------------------ markers
    def _set_points(self, name: str, recs: Sequence[TapRecord], colour: str) -> None:
        viewer = self.viewer
        pts = np.array([[r.slow, r.fast] for r in recs], dtype=float).reshape(-1, 2)
        # the tap marker of a selected pixel leaves the label to the selection's marker
        labels = [("" if name == TAP_LAYER and r.pixel in self.model.selection else r.label) for r in recs]
        feats = {"hkl": labels, "label": labels,
                 "slow": np.array([r.slow for r in recs], dtype=int),
                 "fast": np.array([r.fast for r in recs], dtype=int)}
        layer = self._layer(name)
        if layer is None and not recs:
            return  # made on first use: an empty layer costs a quarter second at start-up
        if layer is None:
            active = viewer.layers.selection.active
            layer = viewer.add_points(
                pts, name=name, features=feats, symbol="disc", size=1.0,
                canvas_size_limits=(MARKER_SCREEN_PX, MARKER_SCREEN_PX),
                face_color="transparent", border_color=colour, border_width=0.12,
                border_width_is_relative=True, opacity=1.0,
                text={"string": "{label}", "color": colour, "size": 11, "anchor": "upper_left",
                      "translation": [0, 0]},
                metadata={"tap_records": list(recs)},
            )
            layer.editable = False
            if active is not None:
                viewer.layers.selection.active = active
            self._raise_markers()
        else:
            layer.data = pts
            layer.features = feats
            layer.metadata["tap_records"] = list(recs)
            layer.editable = False  # napari re-enables editing when data change
        self._spread_labels(layer)

    def _spread_labels(self, layer=None) -> None:
        """Hide selection labels that would overlap another on screen at this zoom."""
        layers = [layer] if layer is not None else [self._layer(n) for n in (SEL_LAYER, TAP_LAYER)]
        zoom = float(self.viewer.scene.camera.zoom) or 1.0
        for lay in layers:
            if lay is None or "hkl" not in lay.features or len(lay.data) == 0:
                continue
            keep = spread_labels(np.asarray(lay.data)[:, -2:] * zoom, LABEL_SEPARATION_PX)
            labels = [h if k else "" for h, k in zip(lay.features["hkl"], keep, strict=True)]
            if list(lay.features["label"]) != labels:
                feats = lay.features.copy()
                feats["label"] = labels
                lay.features = feats
            lay.refresh_text()

    def _on_zoom(self, event=None) -> None:
        self._spread_labels()
        zoom = float(self.viewer.scene.camera.zoom) or 1.0
        for name in (RINGS_LAYER, BOX_LAYER):
            layer = self._layer(name)
            if layer is not None and len(layer.data):
                layer.edge_width = 1.6 / zoom  # lines about 1.6 screen pixels wide

    def _refresh_selection_layer(self) -> None:
        self._set_points(SEL_LAYER, list(self.model.selection.values()), colour=SELECTION_COLOUR)

    def _refresh_points(self) -> None:
        """Marker layers after a render: the tap cleared, the selection as re-tapped
        (layers are made when they first have a marker)."""
        self._set_points(TAP_LAYER, [], colour=TAP_COLOUR)
        self._refresh_selection_layer()

    def _raise_markers(self) -> None:
        """Marker layers above every image (in MARKER_LAYERS order, the tap on top)."""
        layers = self.viewer.layers
        names = [n for n in MARKER_LAYERS if n in layers]
        if not names:
            return
        n = len(layers)
        want = [layers[i].name for i in range(n - len(names), n)]
        if want == names:
            return
        for name in names:
            layers.move(layers.index(name), len(layers))

    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        if layer.name in MARKER_LAYERS:
            return
        self._raise_markers()
        header = ((getattr(layer, "metadata", None) or {}).get("header"))
        if header and self.model.sim is None and getattr(layer, "ndim", 0) == 2:
            self._use_header_geometry(layer, header)

    def _use_header_geometry(self, layer, header: dict) -> None:
        """An opened SMV image: beam centre, rings and hover from its header."""
        try:
            args = header_geometry_args(header)
            sim = _engine.make_simulation(args)
        except Exception as exc:  # noqa: BLE001 - a header without usable geometry
            self._info(f"{layer.name}: no detector geometry in its header ({exc})")
            return
        self._header_sim = (sim, layer)
        self._install_hover(layer)
        self._refresh_geometry()
        self._info(f"{layer.name}: beam centre, rings and d from its SMV header")

    # ------------------------------------------------------------------ geometry
    def _geometry_sim(self):
        if self.model.sim is not None:
            return self.model.sim
        return self._header_sim[0] if self._header_sim is not None else None

    def _refresh_geometry(self) -> None:
        """Beam-centre marker, resolution rings and the HKL table's box outline."""
        sim = self._geometry_sim()
        viewer = self.viewer
        if sim is None:
            return
        centre = _engine.beam_centre(sim)
        pts = np.array([centre], dtype=float) if centre is not None else np.zeros((0, 2))
        layer = self._layer(BEAM_LAYER)
        if layer is None:
            layer = viewer.add_points(pts, name=BEAM_LAYER, symbol="cross", size=1.0, face_color=BEAM_COLOUR,
                                      border_color=BEAM_COLOUR, border_width=0.1, border_width_is_relative=True,
                                      canvas_size_limits=(26, 26), opacity=0.9)
            layer.editable = False
        else:
            layer.data = pts
            layer.editable = False
        self._refresh_rings()
        self._refresh_table_box()
        self._raise_markers()
        self._keep_active()

    def _keep_active(self) -> None:
        sim_layer = self._layer(SIM_LAYER)
        if sim_layer is not None:
            self.viewer.layers.selection.active = sim_layer

    def ring_d_spacings(self) -> list[float]:
        """The d-spacings the rings use.

        Returns
        -------
        list of float
            :attr:`ring_spacings`, else the detector's defaults; empty without geometry.
        """
        sim = self._geometry_sim()
        if self.ring_spacings:
            return list(self.ring_spacings)
        return _engine.default_ring_spacings(sim) if sim is not None else []

    def rings(self, on: bool = True, d_spacings: Sequence[float] | None = None):
        """Show (or hide) resolution rings labelled in Å; ``d_spacings`` None: the
        detector's defaults.  Returns the rings layer (None when hidden).

        Parameters
        ----------
        on : bool
            Show or hide.
        d_spacings : sequence of float, optional
            d-spacings in Å (an empty sequence: the defaults again; None keeps the current ones).

        Returns
        -------
        napari.layers.Shapes or None
            The rings layer; None when hidden or when no ring crosses the detector.

        Raises
        ------
        ValueError
            A d-spacing that is not positive.
        """
        if d_spacings is not None:
            ds = [float(d) for d in d_spacings]
            if any(not d > 0 for d in ds):
                raise ValueError(f"resolution rings need positive d-spacings in Å, got {list(d_spacings)}")
            self.ring_spacings = ds or None
        self.rings_enabled = bool(on)
        self._refresh_rings()
        self._raise_markers()
        self._keep_active()
        self.rings_changed.emit()
        return self._layer(RINGS_LAYER)

    def toggle_rings(self) -> None:
        """Show the rings when hidden, hide them when shown."""
        self.rings(not self.rings_enabled)

    def _refresh_rings(self) -> None:
        viewer = self.viewer
        sim = self._geometry_sim()
        for name in (RINGS_LAYER, RING_LABELS_LAYER):
            if name in viewer.layers and (not self.rings_enabled or sim is None):
                viewer.layers.remove(name)
        if not self.rings_enabled or sim is None:
            return
        paths, label_pts, labels = [], [], []
        centre = _engine.beam_centre(sim)
        for d in self.ring_d_spacings():
            ring = _engine.resolution_ring(sim, d)
            if len(ring) < 2:
                continue
            paths.append(ring)
            # label where the ring is highest on screen and left of centre: away from the spots' labels
            key = ring[:, 0] + (0.25 * ring[:, 1] if centre is None else 0.25 * np.abs(ring[:, 1] - centre[1]))
            ny, nx = sim.shape
            inside = (ring[:, 0] >= 0) & (ring[:, 0] < ny) & (ring[:, 1] >= 0) & (ring[:, 1] < nx)
            cand = np.where(inside)[0] if inside.any() else np.arange(len(ring))
            i = cand[np.argmin(key[cand])]
            label_pts.append(ring[i])
            labels.append(f"{d:g} Å")
        zoom = float(viewer.scene.camera.zoom) or 1.0
        for name in (RINGS_LAYER, RING_LABELS_LAYER):
            if name in viewer.layers:
                viewer.layers.remove(name)
        if not paths:
            self._info("no resolution ring of those d-spacings crosses the detector plane")
            return
        layer = viewer.add_shapes(paths, shape_type="path", name=RINGS_LAYER, edge_color=RING_COLOUR,
                                  edge_width=1.6 / zoom, opacity=0.8)
        layer.editable = False
        lab = viewer.add_points(np.array(label_pts), name=RING_LABELS_LAYER, size=1.0,
                                face_color="transparent", border_width=0, canvas_size_limits=(1, 1),
                                features={"d": labels},
                                text={"string": "{d}", "color": RING_COLOUR, "size": 11, "anchor": "center"})
        lab.editable = False

    def _refresh_table_box(self) -> None:
        """Where the nearest reflection of a pixel centre leaves the HKL table's box."""
        viewer = self.viewer
        if BOX_LAYER in viewer.layers:
            viewer.layers.remove(BOX_LAYER)
        sim = self.model.sim
        if sim is None or sim.setup.hkl is None:
            return
        step = max(1, max(sim.shape) // 512)
        mask = _engine.table_box_mask(sim, step)
        if mask is None or mask.all() or not mask.any():
            return
        from skimage.measure import find_contours

        padded = np.pad(mask.astype(float), 1)  # closed outlines at the detector's edge
        paths = [(c - 1) * step for c in find_contours(padded, 0.5) if len(c) > 2]
        if not paths:
            return
        zoom = float(viewer.scene.camera.zoom) or 1.0
        layer = viewer.add_shapes(paths, shape_type="path", name=BOX_LAYER, edge_color=BOX_COLOUR,
                                  edge_width=1.6 / zoom, opacity=0.9)
        layer.editable = False

    # ------------------------------------------------------------------ selection
    def deselect(self, pixel: tuple[int, int]) -> None:
        """Remove a pixel from the selection and its marker.

        Parameters
        ----------
        pixel : (int, int)
            (slow, fast).
        """
        self.model.deselect(pixel)
        self._refresh_selection_layer()
        self.selection_changed.emit()
        self._info(f"pixel {tuple(pixel)} removed from the selection; {len(self.model.selection)} selected")

    def clear_selection(self) -> None:
        """Empty the selection and its markers."""
        self.model.clear_selection()
        self._refresh_selection_layer()
        self.selection_changed.emit()
        self._info("selection cleared")

    def export(self, folder: str | Path | None = None, *, bundle_root: str | Path | None = None) -> list[Path]:
        """Write the selection (one tap JSON per pixel); [] and a message on failure.

        Parameters
        ----------
        folder : str or Path, optional
            A folder, an existing evidence bundle, or None for a fresh bundle.
        bundle_root : str or Path, optional
            Where a fresh bundle is made.

        Returns
        -------
        list of Path
            The written files (also :attr:`last_export`); empty on failure.
        """
        try:
            paths = self.model.export(folder, bundle_root=bundle_root)
        except Exception as exc:  # noqa: BLE001
            self.report_error(exc, "Export failed")
            return []
        self._info(f"exported {len(self.model.selection)} tap(s) to {Path(paths[0]).parent}")
        self.last_export = paths
        return paths

    def _export_key(self) -> None:
        self.export(None)

    # ------------------------------------------------------------------ default_F overlay
    def set_overlay(self, enabled: bool) -> None:
        """Show or hide the default_F regions (nothing is shown without an HKL table).

        Parameters
        ----------
        enabled : bool
            Show (True) or hide (False).
        """
        self.overlay_enabled = bool(enabled)
        self._refresh_overlay()

    def toggle_overlay(self) -> None:
        """Switch the default_F regions on or off."""
        self.set_overlay(not self.overlay_enabled)

    def _refresh_overlay(self) -> None:
        viewer = self.viewer
        layer = self._layer(FALLBACK_LAYER)
        fb = self.model.fallback
        everywhere = self.model.uses_default_F_everywhere
        if not self.overlay_enabled or fb is None or everywhere:
            if layer is not None:
                viewer.layers.remove(layer)
            if self.overlay_enabled and everywhere:
                self._info(f"no HKL table: every evaluation uses default_F = "
                           f"{self.model.hkl_info.get('default_F')} (no regions to show)")
            self.overlay_changed.emit()
            return
        from napari.utils.colormaps import DirectLabelColormap

        colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        for code, name in fb.reasons.items():
            if name in REASON_COLOURS:
                colours[code] = REASON_COLOURS[name]
        cmap = DirectLabelColormap(color_dict=colours)
        if layer is not None and layer.data.shape != fb.reason.shape:
            viewer.layers.remove(layer)
            layer = None
        if layer is None:
            active = viewer.layers.selection.active
            layer = viewer.add_labels(fb.reason, name=FALLBACK_LAYER, opacity=0.45, colormap=cmap,
                                      metadata={"reasons": dict(fb.reasons)})
            layer.editable = False  # evidence: no paint or erase
            self._install_hover(layer)
            if active is not None:
                viewer.layers.selection.active = active
        else:
            layer.data = fb.reason
            layer.colormap = cmap
            layer.editable = False  # napari re-enables editing when data change
        self._raise_markers()
        self.overlay_changed.emit()

    # ------------------------------------------------------------------ pinned runs, default_F comparison
    def pin(self, name: str | None = None) -> str | None:
        """Keep the current render as a named reference run; its name, or None (message shown).

        Parameters
        ----------
        name : str, optional
            The wanted name (default ``run N``).

        Returns
        -------
        str or None
            The pinned name; None when nothing is rendered.
        """
        try:
            pinned = self.model.pin(name)
        except ValueError as exc:
            self.report_error(exc, "Pin")
            return None
        self.pinned_changed.emit()
        self._info(f"pinned the current render as {pinned!r}")
        return pinned

    def measure_default_F(self, program: str) -> str | None:
        """Measure PROGRAM's default_F map for the current arguments and pin it.

        Parameters
        ----------
        program : str
            The renderer's command line.

        Returns
        -------
        str or None
            Name of the pinned run; None when the measurement failed (message shown).
        """
        self._info(f"measuring the default_F map of {program} (two renders)…", "busy")
        try:
            pinned = self.model.measure_default_F(program)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.report_error(exc, "Measure default_F")
            return None
        self.pinned_changed.emit()
        self._info(f"pinned the measured default_F map as {pinned!r}")
        return pinned

    def compare_default_F(self, reference: str) -> dict | None:
        """default_F regions of the current render against a pinned run: a Labels layer
        with one colour per case and the counts (also returned).

        Parameters
        ----------
        reference : str
            Name of the pinned run.

        Returns
        -------
        dict or None
            The counts (see :meth:`InspectorModel.compare_default_F`); None on failure (message shown).
        """
        try:
            counts = self.model.compare_default_F(reference)
        except ValueError as exc:
            self.report_error(exc, "default_F comparison")
            return None
        self._refresh_default_F_comparison(recompute=False)
        c = counts
        self._info(f"default_F against {reference!r}: both {c['both']:,}, only current {c['only_current']:,}, "
                   f"only reference {c['only_reference']:,} pixels")
        return counts

    def _refresh_default_F_comparison(self, recompute: bool) -> None:
        viewer = self.viewer
        counts = self.model.refresh_default_F_comparison() if recompute else None
        cmp = self.model.default_F_comparison
        layer = self._layer(DEFAULT_F_CMP_LAYER)
        if cmp is None:
            if layer is not None:
                viewer.layers.remove(layer)
            if recompute:
                self.default_F_compared.emit(None)
            return
        from napari.utils.colormaps import DirectLabelColormap

        colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        colours.update({k: v[1] for k, v in DEFAULT_F_CMP_STYLE.items()})
        if layer is not None and layer.data.shape != cmp["labels"].shape:
            viewer.layers.remove(layer)
            layer = None
        if layer is None:
            active = viewer.layers.selection.active
            layer = viewer.add_labels(cmp["labels"], name=DEFAULT_F_CMP_LAYER, opacity=0.5,
                                      colormap=DirectLabelColormap(color_dict=colours))
            if active is not None:
                viewer.layers.selection.active = active
        else:
            layer.data = cmp["labels"]
        layer.editable = False
        layer.metadata["default_F_comparison"] = {"reference": cmp["reference"], "counts": dict(cmp["counts"])}
        self._install_hover(layer)
        self._raise_markers()
        self.default_F_compared.emit(dict(cmp["counts"]) if counts is None else counts)

    # ------------------------------------------------------------------ compare
    def open_reference(self, path: str | Path, shape: tuple[int, int] | None = None,
                       tolerance: float | None = None) -> Comparison | None:
        """Compare the render with a reference image: the difference (shown, with a
        colour bar), the pixels over the tolerance outlined, the reference and the
        ratio (hidden); metrics in the panel.  The reference stays chosen for later
        renders.  ``shape`` is the (slow, fast) of a raw float file without sidecar.

        Parameters
        ----------
        path : str or Path
            The reference image.
        shape : (int, int), optional
            (slow, fast) of a raw file without sidecar.
        tolerance : float, optional
            Relative tolerance (default: the model's).

        Returns
        -------
        Comparison or None
            The comparison; None on failure (its layers removed, message shown).
        """
        try:
            cmp = self.model.compare(path, shape=shape, tolerance=tolerance)
        except Exception as exc:  # noqa: BLE001
            self._remove_comparison_layers()
            self.report_error(exc, "Reference image")
            return None
        self._show_comparison(cmp, new=True)
        return cmp

    def set_tolerance(self, tolerance: float) -> Comparison | None:
        """A new relative tolerance: the outlined pixels and their count follow.

        Parameters
        ----------
        tolerance : float
            Relative tolerance (finite, ≥ 0).

        Returns
        -------
        Comparison or None
            The updated comparison; None without one or for a bad tolerance (message shown).
        """
        try:
            cmp = self.model.set_tolerance(tolerance)
        except ValueError as exc:
            self.report_error(exc, "Tolerance")
            return None
        if cmp is not None:
            self._show_comparison(cmp, new=False)
        return cmp

    def clear_reference(self) -> None:
        """Forget the reference image and remove its layers."""
        self.model.clear_reference()
        self._remove_comparison_layers()

    def _remove_comparison_layers(self) -> None:
        for name in COMPARISON_LAYERS:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self.compared.emit(None)

    def _refresh_comparison(self) -> None:
        """After a render: the chosen reference compared with the new image; when it
        cannot be (another size, the file gone) its layers go and the status says why.
        A reference of another size stays chosen and is compared again once a render
        has its size."""
        if self.model.reference_request is None:
            return
        try:
            cmp = self.model.refresh_comparison()
        except Exception as exc:  # noqa: BLE001
            self._remove_comparison_layers()
            if not isinstance(exc, ReferenceShapeError):
                self.model.clear_reference()
            self.report_error(exc, "Reference image")
            return
        if cmp is not None:
            self._show_comparison(cmp, new=False)

    def _show_comparison(self, cmp: Comparison, new: bool) -> None:
        viewer = self.viewer
        sim_layer = self._layer(SIM_LAYER)
        limits = tuple(sim_layer.contrast_limits) if sim_layer is not None else percentile_limits(cmp.reference)
        finite = cmp.ratio[np.isfinite(cmp.ratio)]
        rlim = percentile_limits(finite, 1.0, 99.0) if finite.size else (0.0, 2.0)
        active = viewer.layers.selection.active
        visible = {name: viewer.layers[name].visible for name in COMPARISON_LAYERS if name in viewer.layers}
        if new:  # a new reference: the difference and the outlines shown, the others hidden
            visible = {REF_LAYER: False, DIFF_LAYER: True, RATIO_LAYER: False, OVER_TOL_LAYER: True}
            if sim_layer is not None:
                sim_layer.visible = True
        images = [
            (REF_LAYER, cmp.reference, dict(colormap="gray_r", contrast_limits=limits, gamma=self.gamma)),
            (DIFF_LAYER, cmp.difference, dict(colormap="bwr", contrast_limits=cmp.limits)),
            (RATIO_LAYER, cmp.ratio, dict(colormap="viridis", contrast_limits=rlim)),
        ]
        meta = {"path": str(cmp.path), "tolerance": cmp.tolerance, "threshold": cmp.threshold,
                "pixels_over_tolerance": cmp.n_over_tolerance}
        for name, data, kw in images:
            layer = self._layer(name)
            if layer is not None and layer.data.shape != data.shape:
                viewer.layers.remove(layer)
                layer = None
            if layer is None:
                layer = viewer.add_image(data, name=name, interpolation2d="nearest", **kw)
                self._install_hover(layer)
            else:
                layer.data = data
                lo, hi = kw["contrast_limits"]
                layer.contrast_limits_range = (min(lo, float(np.nanmin(data))), max(hi, float(np.nanmax(data))))
                layer.contrast_limits = kw["contrast_limits"]
            layer.metadata.update(meta)
            layer.visible = visible.get(name, False)
        diff_layer = self._layer(DIFF_LAYER)
        try:  # napari's colour bar of the difference (photons)
            diff_layer.colorbar.visible = bool(diff_layer.visible)
        except AttributeError:
            pass
        from napari.utils.colormaps import DirectLabelColormap

        over = self._layer(OVER_TOL_LAYER)
        if over is not None and over.data.shape != cmp.over_tolerance.shape:
            viewer.layers.remove(over)
            over = None
        if over is None:
            over = viewer.add_labels(cmp.over_tolerance, name=OVER_TOL_LAYER, opacity=0.9,
                                     colormap=DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                                                              1: OVER_TOL_COLOUR}))
            over.contour = 1
            self._install_hover(over)
        else:
            over.data = cmp.over_tolerance
        over.editable = False
        over.metadata.update(meta)
        over.visible = visible.get(OVER_TOL_LAYER, True)
        if FALLBACK_LAYER in viewer.layers:  # the overlays above the comparison images, markers above them
            viewer.layers.move(viewer.layers.index(FALLBACK_LAYER), len(viewer.layers))
        if DEFAULT_F_CMP_LAYER in viewer.layers:
            viewer.layers.move(viewer.layers.index(DEFAULT_F_CMP_LAYER), len(viewer.layers))
        self._raise_markers()
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active
        m = cmp.metrics
        note = self.model.reference_note
        self._info(f"compared with {Path(cmp.path).name}: correlation {m.get('correlation', float('nan')):.6f}, "
                   f"sum ratio {m.get('sum_ratio', float('nan')):.6f}, {cmp.n_over_tolerance:,} pixels over "
                   f"{cmp.tolerance:g}·max" + (f"; {note}" if note else ""),
                   "error" if note.startswith(("WARNING", "warning")) or "NOT converted" in note else "info")
        self.compared.emit(cmp)

    def flip(self) -> str | None:
        """Cycle the comparison's views: difference → reference → simulated → difference.
        The simulated image and the reference are never shown together.

        Returns
        -------
        str or None
            Name of the layer now shown; None without a reference image.
        """
        sim, ref, diff = self._layer(SIM_LAYER), self._layer(REF_LAYER), self._layer(DIFF_LAYER)
        if sim is None or ref is None:
            self._info("open a reference image to flip between the two", "info")
            return None
        if diff is not None and diff.visible:
            shown = REF_LAYER
        elif ref.visible or diff is None:
            shown = SIM_LAYER if ref.visible else REF_LAYER
        else:
            shown = DIFF_LAYER
        sim.visible = shown in (SIM_LAYER, DIFF_LAYER)
        ref.visible = shown == REF_LAYER
        if diff is not None:
            diff.visible = shown == DIFF_LAYER
            try:
                diff.colorbar.visible = diff.visible
            except AttributeError:
                pass
        self._info(f"showing the {shown} image ({KEYS['flip']}: difference → reference → simulated)")
        return shown

    def describe_args(self) -> str:
        """The model's arguments as one shell-quoted line.

        Returns
        -------
        str
            The line.
        """
        return join_args(self.model.args)


def tap_doc(rec: TapRecord) -> dict:
    """The tap JSON document of a record (engine taps; stored documents as read).

    Parameters
    ----------
    rec : TapRecord
        The record.

    Returns
    -------
    dict
        ``rec.tap.to_json()`` for an engine tap, a copy of the stored document otherwise.
    """
    if rec.source != "engine":
        return dict(rec.tap)
    return rec.tap.to_json()


_CONTROLLERS: dict[int, tuple[weakref.ref, InspectorController]] = {}


def controller_for(viewer, cwd: str | None = None) -> InspectorController:
    """The controller of this viewer (made on first use), shared by all panels.

    In a Qt application renders run in a worker thread
    (:class:`bragg_inspector._qt.worker.QtRunner`), otherwise in the caller's thread.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer (or napari's proxy of it).
    cwd : str, optional
        Folder for relative paths; used only when the controller is made.

    Returns
    -------
    InspectorController
        The viewer's controller.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands panels a PublicOnlyProxy
    key = id(viewer)
    entry = _CONTROLLERS.get(key)
    if entry is not None and entry[0]() is viewer:
        return entry[1]
    runner = None
    if getattr(viewer, "window", None) is not None:
        from ._qt.worker import QtRunner

        runner = QtRunner()
    ctrl = InspectorController(viewer, cwd=cwd, runner=runner)
    if runner is not None:
        from ._qt.worker import on_window_close

        on_window_close(viewer, ctrl.detach)
    _CONTROLLERS[key] = (weakref.ref(viewer, lambda _r, k=key: _CONTROLLERS.pop(k, None)), ctrl)
    return ctrl
