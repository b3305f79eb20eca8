"""The "Bragg simulation" dock panel (magicgui): arguments, HKL file, device,
Run/Cancel with progress, contrast, structure-factor source, rings, default_F
regions, the comparison with a reference image and the fit to it."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    TextEdit,
)
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSizePolicy

from ..args import join_args, split_args
from ..controller import KEY_HELP, KEYS, controller_for
from ..io import image_suffixes

if TYPE_CHECKING:
    import napari

__all__ = ["SimulationPanel", "DEFAULT_FIT_PARAMS", "wrapped_label", "fit_label", "heading", "row", "fit_html"]

#: the parameters the fit field starts with
DEFAULT_FIT_PARAMS = "distance,beam_center,misset"
STATUS_STYLE = {"error": "color: #ff6b6b;", "busy": "color: #ffd166;", "warning": "color: #f4a261;", "info": ""}


def _devices(_widget=None) -> list[str]:
    """cpu, and cuda when torch sees a GPU (asked once torch is loaded: the panel
    opens without importing it; napari refreshes the choices on layer changes)."""
    import sys

    out = ["cpu"]
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)  # torch may be half-imported by the render thread
    try:
        if cuda is not None and cuda.is_available():
            out.append("cuda")
    except (AttributeError, RuntimeError):  # not ready yet: napari asks again on the next layer change
        pass
    return out


def wrapped_label(value: str = "", name: str = "") -> Label:
    """A selectable, word-wrapped label that grows with its text.

    Parameters
    ----------
    value : str
        The text.
    name : str
        The widget's name.

    Returns
    -------
    magicgui.widgets.Label
        The label.
    """
    lab = Label(value=value, name=name)
    q = lab.native
    q.setWordWrap(True)
    q.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    q.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    return lab


def fit_label(lab: Label) -> None:
    """Qt sizes a wrapped label from its first text: ask for the wrapped height again
    (now, and once the layout has given the label its width).

    Parameters
    ----------
    lab : magicgui.widgets.Label
        A label made by :func:`wrapped_label`.
    """
    from qtpy.QtCore import QTimer

    def fit():
        q = lab.native
        h = q.heightForWidth(max(1, q.width()))
        if h > 0 and h != q.minimumHeight():
            q.setMinimumHeight(h)
            w = q
            while w is not None:  # the containers (and napari's scroll area) take the new height
                w.updateGeometry()
                if w.layout() is not None:
                    w.layout().activate()
                w = w.parentWidget()

    fit()
    timer = QTimer(lab.native)  # a child of the label: deleted with it, so never fires on a deleted panel
    timer.setSingleShot(True)
    timer.timeout.connect(fit)
    timer.timeout.connect(timer.deleteLater)
    timer.start(0)


def heading(text: str) -> Label:
    """A bold section heading.

    Parameters
    ----------
    text : str
        The heading (HTML-escaped).

    Returns
    -------
    magicgui.widgets.Label
        The label.
    """
    return Label(value=f"<b>{html.escape(text)}</b>")


def row(*widgets) -> Container:
    """Widgets side by side, without labels.

    Parameters
    ----------
    *widgets : magicgui.widgets.Widget
        The widgets, left to right.

    Returns
    -------
    magicgui.widgets.Container
        A horizontal container.
    """
    return Container(widgets=list(widgets), layout="horizontal", labels=False)


def fit_html(res) -> str:
    """A fit's parameters (start, fitted, offset ± uncertainty) and metrics (before, after) as HTML tables.

    Parameters
    ----------
    res : torchbragg.fit.FitResult
        The fit.

    Returns
    -------
    str
        Rich text for a label.
    """
    esc = html.escape
    cols = (("parameter", "left"), ("start", "right"), ("fitted", "right"), ("offset ± σ", "right"),
            ("", "left"))
    head = "".join(f"<th align='{a}'>{t}</th>" for t, a in cols)
    rows = []
    for p in res.parameters:
        name = p["family"] if p["component"] == p["family"] else f"{p['family']}.{p['component']}"
        unc = f" ± {p['uncertainty']:.2g}" if p["uncertainty"] is not None else ""
        rows.append(f"<tr><td title='{esc(p['flag'])}'>{esc(name)}</td><td align='right'>{p['start']:.6g}</td>"
                    f"<td align='right'>{p['fitted']:.6g}</td><td align='right'>{p['offset']:+.3g}{esc(unc)}</td>"
                    f"<td>{esc(p['unit'])}</td></tr>")
    b, a = res.metrics_before, res.metrics_after
    metrics = [("loss", "loss", "{:.4g}"), ("rmsd", "rmsd (photons)", "{:.4g}"),
               ("max_abs_diff", "max |diff| (photons)", "{:.4g}"), ("correlation", "correlation", "{:.6f}")]
    mrows = "".join(f"<tr><td>{esc(label)}</td><td align='right'>{fmt.format(b[k])}</td>"
                    f"<td align='right'>{fmt.format(a[k])}</td></tr>" for k, label, fmt in metrics)
    return (f"<table cellspacing='4'><tr>{head}</tr>{''.join(rows)}</table>"
            f"<table cellspacing='4'><tr><th align='left'>{esc(res.loss)} fit</th><th align='right'>before</th>"
            f"<th align='right'>after</th></tr>{mrows}</table>"
            f"<small>{a['pixels']:,} pixels, {res.iterations} loss evaluations</small>")


class SimulationPanel(Container):
    """nanoBragg arguments → Run; where F came from; rings; default_F regions; compare.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer (napari passes it); the panel uses its shared controller (:func:`controller_for`).

    Attributes
    ----------
    controller : InspectorController
        The viewer's controller.
    args_edit : magicgui.widgets.TextEdit
        The nanoBragg argument line.
    status_label : magicgui.widgets.Label
        The controller's status messages.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self.controller = c = controller_for(viewer)
        m = c.model
        self.args_edit = TextEdit(value=join_args(m.args), name="args_edit",
                                  tooltip="The nanoBragg command line (without the program name)")
        self.args_edit.native.setFixedHeight(84)
        self.hkl_file = FileEdit(mode="r", filter="HKL files (*.hkl *.txt);;All files (*)", nullable=True,
                                 name="hkl_file", tooltip="adds or replaces -hkl in the arguments")
        self.hkl_clear = PushButton(text="×", tooltip="remove -hkl")
        self.hkl_clear.native.setMaximumWidth(28)
        self.device_combo = ComboBox(choices=_devices, value=m.device, label="device")
        self.dtype_combo = ComboBox(choices=["float32", "float64"], value=m.dtype, label="dtype")
        self.run_button = PushButton(text="Run", name="run_button")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=100, name="progress", tooltip="render progress")
        self.progress.native.setFormat("%p%")
        self.percentile_spin = FloatSpinBox(value=c.upper_percentile, min=50.0, max=100.0, step=0.1,
                                            label="upper %ile",
                                            tooltip="contrast limits: 0th to this percentile of the image")
        self.gamma_spin = FloatSpinBox(value=c.gamma, min=0.05, max=3.0, step=0.05, label="gamma",
                                       tooltip="gamma < 1 brightens weak features (log-like)")
        self.status_label = wrapped_label(name="status_label")
        self.hkl_info_label = wrapped_label("(not rendered yet)", name="hkl_info_label")
        self.rings_check = CheckBox(text=f"resolution rings ({KEYS['rings']})", value=c.rings_enabled)
        self.rings_edit = LineEdit(value="", name="ring_spacings",
                                   tooltip="d-spacings in Å, e.g. '10 5 3.5'; blank: chosen from the detector")
        self.rings_edit.native.setPlaceholderText("d in Å (blank: automatic)")
        self.overlay_check = CheckBox(text=f"show default_F regions ({KEYS['overlay']})", value=False)
        self.legend_label = Label(value="", name="legend_label")
        self.pin_name = LineEdit(value="", name="pin_name", tooltip="name of the pinned run (blank: run N)")
        self.pin_name.native.setPlaceholderText("name (blank: run N)")
        self.pin_button = PushButton(text="Pin current run")
        self.pinned_combo = ComboBox(choices=self._pinned_choices, name="pinned_runs", label="reference",
                                     nullable=True)
        self.compare_button = PushButton(text="Compare default_F")
        self.program_file = FileEdit(mode="r", nullable=True, name="renderer_program", label="program",
                                     tooltip="a nanoBragg-compatible program (the C nanoBragg, another port, "
                                             "torchbragg): its default_F map is measured from two renders")
        self.measure_button = PushButton(text="Measure with program")
        self.cmp_legend = Label(value="", name="default_F_comparison_legend")
        patterns = " ".join(f"*{suffix}" for suffix in image_suffixes())
        self.ref_file = FileEdit(mode="r", filter=f"Images ({patterns});;All files (*)",
                                 nullable=True, name="reference_file", label="reference")
        self.ref_shape = LineEdit(value="", name="reference_shape", label="shape",
                                  tooltip="slow×fast of a raw float reference without a .json sidecar "
                                          "(blank: the simulation's size)")
        self.ref_shape.native.setPlaceholderText("raw file: slow×fast (blank: as simulated)")
        self.tolerance_spin = FloatSpinBox(value=c.model.tolerance, min=0.0, max=1.0, step=1e-4,
                                           name="tolerance", label="tolerance",
                                           tooltip="pixels with |sim − ref| > tolerance × max|ref| are outlined")
        self.tolerance_spin.native.setDecimals(6)
        self.ref_clear = PushButton(text="×", tooltip="forget the reference image")
        self.ref_clear.native.setMaximumWidth(28)
        self.flip_button = PushButton(text=f"Difference → ref → sim ({KEYS['flip']})")
        self.metrics_label = wrapped_label(name="metrics_label")
        self.fit_params = LineEdit(value=DEFAULT_FIT_PARAMS, name="fit_params",
                                   tooltip="comma-separated parameter families to fit, e.g. distance, beam_center, "
                                           "detector_rotation, twotheta, misset, cell, mosaic, wavelength")
        self.fit_loss = ComboBox(choices=["lsq", "poisson"], value="lsq", name="fit_loss", label="loss",
                                 tooltip="lsq: sum of squared differences; poisson: negative Poisson "
                                         "log-likelihood of the reference's counts")
        self.fit_iterations = SpinBox(value=60, min=1, max=1000, name="fit_iterations", label="evaluations",
                                      tooltip="the most loss evaluations of the optimiser (L-BFGS)")
        self.fit_region = LineEdit(value="", name="fit_region",
                                   tooltip="pixels compared: xmin xmax ymin ymax (fast and slow, inclusive, as "
                                           "-roi); blank: the whole image")
        self.fit_region.native.setPlaceholderText("region: xmin xmax ymin ymax (blank: all)")
        self.fit_button = PushButton(text="Fit to reference", name="fit_button",
                                     tooltip="fit these parameters of the arguments above to the reference "
                                             "image (float64; Cancel stops it)")
        self.fit_result_label = wrapped_label(name="fit_result_label")
        self.fit_result_label.native.setTextFormat(Qt.TextFormat.RichText)
        self.use_fit_button = PushButton(text="Use fitted arguments", name="use_fit_button", enabled=False,
                                         tooltip="put the fitted values in the nanoBragg arguments (press Run "
                                                 "to render them)")
        super().__init__(
            widgets=[
                heading("Simulation"), Label(value="nanoBragg arguments:"), self.args_edit,
                row(self.hkl_file, self.hkl_clear), row(self.device_combo, self.dtype_combo),
                row(self.run_button, self.cancel_button), self.progress,
                row(self.percentile_spin, self.gamma_spin), self.status_label,
                heading("Structure factors"), self.hkl_info_label,
                heading("Geometry"), row(self.rings_check, self.rings_edit),
                heading("default_F regions"), self.overlay_check, self.legend_label,
                heading("Compare default_F regions"), row(self.pin_name, self.pin_button),
                row(self.pinned_combo, self.compare_button), row(self.program_file, self.measure_button),
                self.cmp_legend,
                heading("Compare with a reference image"), row(self.ref_file, self.ref_clear), self.ref_shape,
                row(Label(value="tolerance (× max|ref|)"), self.tolerance_spin), self.flip_button,
                self.metrics_label,
                heading("Fit to the reference image"), row(Label(value="parameters"), self.fit_params),
                row(Label(value="loss"), self.fit_loss, Label(value="evaluations"), self.fit_iterations),
                self.fit_region, row(self.fit_button, self.use_fit_button), self.fit_result_label,
            ],
            labels=False, name="bragg_inspector_simulation",
        )
        self.native.setObjectName("bragg_inspector_simulation")
        self.overlay_check.native.setText(f"show default_F regions ({KEYS['overlay']})")  # magicgui turns "_" into " "
        self.tooltip = "Shortcuts: " + KEY_HELP
        self.legend_label.native.setTextFormat(Qt.TextFormat.RichText)
        self.cmp_legend.native.setTextFormat(Qt.TextFormat.RichText)
        self.compare_button.native.setText("Compare default_F")  # magicgui turns "_" into " "
        self._wire()
        self._on_args(m.args)
        self._on_rendered()

    # ------------------------------------------------------------------ wiring
    def _wire(self) -> None:
        c = self.controller
        self.run_button.changed.connect(self._run)
        self.cancel_button.changed.connect(c.cancel)
        self.hkl_file.changed.connect(self._on_hkl_chosen)
        self.hkl_clear.changed.connect(lambda: self.set_hkl(None))
        self.percentile_spin.changed.connect(lambda v: c.set_contrast(upper_percentile=v))
        self.gamma_spin.changed.connect(lambda v: c.set_contrast(gamma=v))
        self.overlay_check.changed.connect(c.set_overlay)
        self.rings_check.changed.connect(self._on_rings)
        self.rings_edit.changed.connect(lambda _v: self._on_rings(self.rings_check.value))
        self.ref_file.changed.connect(self._on_reference_chosen)
        self.ref_shape.changed.connect(lambda _v: self._on_reference_chosen(self.ref_file.value))
        self.ref_clear.changed.connect(self._clear_reference)
        self.tolerance_spin.changed.connect(c.set_tolerance)
        self.flip_button.changed.connect(c.flip)
        self.pin_button.changed.connect(self._pin)
        self.compare_button.changed.connect(self._compare_default_F)
        self.measure_button.changed.connect(self._measure)
        c.pinned_changed.connect(self.pinned_combo.reset_choices)
        c.default_F_compared.connect(self._on_default_F_compared)
        c.status.connect(self._on_status)
        c.args_changed.connect(self._on_args)
        c.render_started.connect(self._on_started)
        c.render_progress.connect(self._on_progress)
        c.render_finished.connect(self._on_finished)
        c.rendered.connect(self._on_rendered)
        c.overlay_changed.connect(self._on_overlay)
        c.rings_changed.connect(self._on_rings_changed)
        c.compared.connect(self._on_compared)
        self.fit_button.changed.connect(self._fit)
        self.use_fit_button.changed.connect(lambda *_: c.use_fitted_args())
        c.fit_started.connect(self._on_fit_started)
        c.fit_progress.connect(self._on_progress)
        c.fit_finished.connect(self._on_fit_finished)

    # ------------------------------------------------------------------ actions
    def args_text(self) -> str:
        """The argument line as typed.

        Returns
        -------
        str
            The text without leading and trailing white space.
        """
        return self.args_edit.value.strip()

    def _run(self, *_):
        self.controller.simulate(self.args_text(), device=self.device_combo.value,
                                 dtype=self.dtype_combo.value, wait=False)

    def _fit(self, *_):
        self.controller.fit_reference(self.fit_params.value.strip(), self.args_text(),
                                      device=self.device_combo.value, loss=self.fit_loss.value,
                                      max_iter=int(self.fit_iterations.value), region=self.fit_region.value)

    def set_hkl(self, path) -> None:
        """Add, replace (a path) or remove (None) ``-hkl`` in the argument line.

        Parameters
        ----------
        path : str or Path or None
            The HKL file, or None to remove ``-hkl``.
        """
        try:
            self.controller.set_hkl(None if path is None else str(path), self.args_text())
        except ValueError as exc:
            self.controller.report_error(exc, "Bad argument line")

    def _on_hkl_chosen(self, value):
        if value is not None and str(value) not in ("", "."):
            self.set_hkl(value)

    def reference_shape(self) -> tuple[int, int] | None:
        """The shape field as (slow, fast); None when blank.  Raises ValueError.

        Accepts ``×``, ``x``, commas or spaces between the two numbers.

        Returns
        -------
        (int, int) or None
            The shape.

        Raises
        ------
        ValueError
            Not two positive integers.
        """
        text = self.ref_shape.value.strip().lower().replace("x", " ").replace("×", " ").replace(",", " ")
        if not text:
            return None
        parts = text.split()
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape {self.ref_shape.value!r}: expected slow×fast, e.g. 1024×1024")
        return shape

    def _on_reference_chosen(self, value):
        if value is None or str(value) in ("", ".") or not Path(value).is_file():
            return
        try:
            shape = self.reference_shape()
        except ValueError as exc:
            self.controller.report_error(exc, "Reference image")
            return
        self.controller.open_reference(value, shape=shape, tolerance=self.tolerance_spin.value)

    def _clear_reference(self, *_):
        with self.ref_file.changed.blocked():
            self.ref_file.value = None
        self.controller.clear_reference()

    def _pinned_choices(self, _widget=None) -> list[str]:
        return list(self.controller.model.pinned)

    def _pin(self, *_):
        name = self.controller.pin(self.pin_name.value or None)
        if name is not None:
            self.pinned_combo.value = name

    def _compare_default_F(self, *_):
        if self.pinned_combo.value is None:
            self.controller.report_error("pin a run (or measure a program) first", "default_F comparison")
            return
        self.controller.compare_default_F(self.pinned_combo.value)

    def _measure(self, *_):
        prog = self.program_file.value
        if prog is None or str(prog) in ("", "."):
            self.controller.report_error("choose the program to measure first", "Measure default_F")
            return
        name = self.controller.measure_default_F(str(prog))
        if name is not None:
            self.pinned_combo.value = name

    def _on_default_F_compared(self, counts):
        from ..controller import DEFAULT_F_CMP_STYLE

        cmp = self.controller.model.default_F_comparison
        if counts is None or cmp is None:
            self.cmp_legend.value = ""
            return
        shown = {1: counts["both"] - counts["reason_changed"], 2: counts["only_current"],
                 3: counts["only_reference"], 4: counts["reason_changed"]}  # one count per colour
        rows = [f"<tr><td><span style='background-color:{colour};'>&nbsp;&nbsp;&nbsp;&nbsp;</span></td>"
                f"<td>{html.escape(text)}</td><td align='right'>{shown[code]:,} px</td></tr>"
                for code, (text, colour) in DEFAULT_F_CMP_STYLE.items()]
        self.cmp_legend.value = (f"<small>against {html.escape(cmp['reference'])}</small>"
                                 f"<table cellspacing='3'>{''.join(rows)}</table>")

    def _on_rings(self, on):
        text = self.rings_edit.value.replace(",", " ").split()
        try:
            ds = [float(x) for x in text] if text else []
            self.controller.rings(bool(on), d_spacings=ds)
        except ValueError as exc:
            self.controller.report_error(exc, "Resolution rings")

    # ------------------------------------------------------------------ views
    def _on_status(self, msg: str, level: str):
        self.status_label.value = msg
        self.status_label.native.setStyleSheet(STATUS_STYLE.get(level, ""))
        fit_label(self.status_label)

    def _on_args(self, args):
        try:
            same = split_args(self.args_text()) == list(args)
        except ValueError:
            same = False
        if not same:
            self.args_edit.value = join_args(args)
        hkl = self.controller.hkl_of(args)
        cwd = self.controller.model.cwd
        if hkl and cwd and not Path(hkl).is_absolute():
            hkl = str(Path(cwd) / hkl)  # where the engine reads it (the inspector's folder)
        with self.hkl_file.changed.blocked():
            self.hkl_file.value = hkl if hkl else None

    def _on_started(self):
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0

    def _on_progress(self, done: int, total: int):
        if total > 0:
            self.progress.value = int(round(100 * done / total))

    def _on_finished(self, ok: bool):
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if ok:
            self.progress.value = 100

    def _on_rendered(self):
        m = self.controller.model
        lines = m.hkl_lines()
        self.hkl_info_label.value = "\n".join(lines) if lines else "(not rendered yet)"
        fit_label(self.hkl_info_label)
        self.device_combo.reset_choices()
        self.device_combo.value = m.device
        self.dtype_combo.value = m.dtype
        self._on_overlay()

    def _on_rings_changed(self):
        with self.rings_check.changed.blocked():
            self.rings_check.value = self.controller.rings_enabled
        if self.controller.rings_enabled and not self.rings_edit.value.strip():
            self.rings_edit.native.setPlaceholderText(
                "automatic: " + " ".join(f"{d:g}" for d in self.controller.ring_d_spacings()) + " Å")

    def _on_overlay(self):
        c = self.controller
        with self.overlay_check.changed.blocked():
            self.overlay_check.value = c.overlay_enabled
        m = c.model
        fb = m.fallback
        if m.uses_default_F_everywhere:
            self.legend_label.value = (f"no HKL table: every evaluation uses default_F = "
                                       f"{html.escape(str(m.hkl_info.get('default_F')))}")
            return
        legend = m.fallback_legend()
        if not legend:
            self.legend_label.value = ""
            return
        rows = [f"<tr><td><span style='background-color:{e['colour']};'>&nbsp;&nbsp;&nbsp;&nbsp;</span></td>"
                f"<td>{html.escape(e['text'])}</td><td align='right'>{e['pixels']:,} px</td></tr>" for e in legend]
        total = int(fb.counts.sum(dtype="int64"))
        n_eval = fb.evaluations_per_pixel * fb.counts.size
        foot = f"{total:,} of {n_eval:,} evaluations used default_F"
        self.legend_label.value = f"<table cellspacing='3'>{''.join(rows)}</table><small>{foot}</small>"

    def _on_compared(self, cmp):
        if cmp is None:
            self.metrics_label.value = ""
            return
        with self.tolerance_spin.changed.blocked():
            self.tolerance_spin.value = cmp.tolerance
        m = cmp.metrics
        keys = [("correlation", "correlation", "{:.6f}"), ("rmse", "RMSE", "{:.4g}"),
                ("sum_ratio", "sum ratio (sim/ref)", "{:.6f}"), ("max_abs_diff", "max |difference|", "{:.4g}")]
        lines = [f"reference: {Path(cmp.path).name}"]
        lines += [f"{label}: {fmt.format(m[k])}" for k, label, fmt in keys if k in m]
        lines.append(f"over tolerance (|diff| > {cmp.threshold:.4g} photons): {cmp.n_over_tolerance:,} px "
                     f"(outlined)")
        lines.append(f"difference colours: ±{cmp.limits[1]:.4g} photons")
        if self.controller.model.reference_note:
            lines.append(self.controller.model.reference_note)
        self.metrics_label.value = "\n".join(lines)
        fit_label(self.metrics_label)

    # ------------------------------------------------------------------ fit
    def _on_fit_started(self):
        self.run_button.enabled = False
        self.fit_button.enabled = False
        self.use_fit_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.fit_result_label.value = ""

    def _on_fit_finished(self, res):
        self.run_button.enabled = True
        self.fit_button.enabled = True
        self.cancel_button.enabled = False
        self.use_fit_button.enabled = res is not None
        if res is None:
            self.fit_result_label.value = ""
            return
        self.progress.value = 100
        self.fit_result_label.value = fit_html(res)
        fit_label(self.fit_result_label)

