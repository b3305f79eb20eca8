"""Thin Qt panels: they only show what the controller/model hold and forward
user actions to the controller."""

from __future__ import annotations

import html
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QGridLayout, QGroupBox,
    QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPlainTextEdit,
    QPushButton, QSizePolicy, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from .args import join_args, split_args
from .controller import FLIP_KEY, InspectorController
from .model import format_cell

DEFAULT_F_ROW_COLOUR = QColor(255, 140, 0, 90)
STATUS_STYLE = {"error": "color: #ff6b6b;", "busy": "color: #ffd166;", "info": ""}


def _devices() -> list[str]:
    out = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            out.append("mps")
    except Exception:  # pragma: no cover
        pass
    return out


class _WrapLabel(QLabel):
    """A word-wrapped label that asks for the height of its wrapped text.

    Qt sizes a wrapped label from its first text; a longer text set later was clipped to
    the old height (a second line lost) in napari's dock.
    """

    def _fit(self) -> None:
        h = self.heightForWidth(max(1, self.width()))
        if h > 0 and h != self.minimumHeight():
            self.setMinimumHeight(h)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's name
        super().setText(text)
        self._fit()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._fit()


def _wrap_label(text: str = "") -> QLabel:
    lab = _WrapLabel(text)
    lab.setWordWrap(True)
    lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    lab.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    return lab


class SimulationWidget(QWidget):
    """nanoBragg arguments, HKL file, device/dtype, Run/Cancel, F source,
    default_F regions, and comparison with a reference image."""

    def __init__(self, controller: InspectorController, parent=None):
        super().__init__(parent)
        self.controller = c = controller
        self.setObjectName("bragg_inspector_simulation")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)

        # --- simulation
        box = QGroupBox("Simulation")
        form = QVBoxLayout(box)
        form.addWidget(QLabel("nanoBragg arguments:"))
        self.args_edit = QPlainTextEdit(join_args(c.model.args))
        self.args_edit.setObjectName("args_edit")
        self.args_edit.setFixedHeight(84)
        self.args_edit.setToolTip("The nanoBragg command line (without the program name)")
        form.addWidget(self.args_edit)
        row = QHBoxLayout()
        self.hkl_edit = QLineEdit(c.hkl_of(c.model.args) or "")
        self.hkl_edit.setPlaceholderText("no HKL file (default_F only)")
        self.hkl_edit.setReadOnly(True)
        self.hkl_button = QPushButton("HKL file…")
        self.hkl_clear = QPushButton("×")
        self.hkl_clear.setToolTip("remove -hkl")
        self.hkl_clear.setMaximumWidth(28)
        row.addWidget(self.hkl_edit, 1)
        row.addWidget(self.hkl_button)
        row.addWidget(self.hkl_clear)
        form.addLayout(row)
        row = QHBoxLayout()
        self.device_combo = QComboBox()
        self.device_combo.addItems(_devices())
        self.dtype_combo = QComboBox()
        self.dtype_combo.addItems(["float32", "float64"])
        row.addWidget(QLabel("device"))
        row.addWidget(self.device_combo)
        row.addWidget(QLabel("dtype"))
        row.addWidget(self.dtype_combo)
        row.addStretch(1)
        form.addLayout(row)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setObjectName("run_button")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        form.addLayout(row)
        row = QHBoxLayout()
        self.percentile_spin = QDoubleSpinBox()
        self.percentile_spin.setRange(50.0, 100.0)
        self.percentile_spin.setDecimals(1)
        self.percentile_spin.setSingleStep(0.1)
        self.percentile_spin.setValue(c.upper_percentile)
        self.percentile_spin.setMinimumWidth(80)
        self.percentile_spin.setToolTip("contrast limits: 0th to this percentile of the image")
        self.gamma_spin = QDoubleSpinBox()
        self.gamma_spin.setRange(0.05, 3.0)
        self.gamma_spin.setSingleStep(0.05)
        self.gamma_spin.setValue(c.gamma)
        self.gamma_spin.setMinimumWidth(70)
        self.gamma_spin.setToolTip("gamma < 1 brightens weak features (log-like)")
        row.addWidget(QLabel("upper %ile"))
        row.addWidget(self.percentile_spin, 1)
        row.addWidget(QLabel("gamma"))
        row.addWidget(self.gamma_spin, 1)
        form.addLayout(row)
        self.status_label = _wrap_label("")
        self.status_label.setObjectName("status_label")
        form.addWidget(self.status_label)
        lay.addWidget(box)

        # --- where F came from
        box = QGroupBox("Structure factors")
        v = QVBoxLayout(box)
        self.hkl_info_label = _wrap_label("(not rendered yet)")
        v.addWidget(self.hkl_info_label)
        lay.addWidget(box)

        # --- default_F regions
        box = QGroupBox("default_F regions")
        v = QVBoxLayout(box)
        self.overlay_check = QCheckBox("show default_F regions layer")
        self.legend_label = QLabel("")
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        v.addWidget(self.overlay_check)
        v.addWidget(self.legend_label)
        lay.addWidget(box)

        # --- compare
        box = QGroupBox("Compare with a reference image")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.ref_button = QPushButton("Reference image…")
        self.flip_button = QPushButton(f"Flip sim/ref ({FLIP_KEY})")
        row.addWidget(self.ref_button)
        row.addWidget(self.flip_button)
        v.addLayout(row)
        self.metrics_label = _wrap_label("")
        v.addWidget(self.metrics_label)
        lay.addWidget(box)
        lay.addStretch(1)

        # --- wiring
        self.run_button.clicked.connect(self._run)
        self.cancel_button.clicked.connect(c.cancel)
        self.hkl_button.clicked.connect(self._choose_hkl)
        self.hkl_clear.clicked.connect(lambda: self._set_hkl(None))
        self.percentile_spin.valueChanged.connect(lambda v: c.set_contrast(upper_percentile=v))
        self.gamma_spin.valueChanged.connect(lambda v: c.set_contrast(gamma=v))
        self.overlay_check.toggled.connect(c.set_overlay)
        self.ref_button.clicked.connect(self._choose_reference)
        self.flip_button.clicked.connect(c.flip)
        c.status.connect(self._on_status)
        c.args_changed.connect(self._on_args)
        c.render_started.connect(self._on_started)
        c.render_finished.connect(self._on_finished)
        c.rendered.connect(self._on_rendered)
        c.overlay_changed.connect(self._on_overlay)
        c.compared.connect(self._on_compared)
        self._on_rendered()

    # actions ------------------------------------------------------------
    def args_text(self) -> str:
        return self.args_edit.toPlainText().strip()

    def _run(self):
        self.controller.simulate(self.args_text(), device=self.device_combo.currentText(),
                                 dtype=self.dtype_combo.currentText(), wait=False)

    def _set_hkl(self, path):
        try:
            self.controller.set_hkl(path, self.args_text())
        except ValueError as exc:
            self.controller.report_error(exc, "Bad argument line")

    def _choose_hkl(self):
        path, _ = QFileDialog.getOpenFileName(self, "HKL file", "", "HKL files (*.hkl *.txt);;All files (*)")
        if path:
            self._set_hkl(path)

    def _choose_reference(self):
        path, _ = QFileDialog.getOpenFileName(
            self, "Reference image", "", "Images (*.f32 *.bin *.img *.smv);;All files (*)")
        if path:
            self.controller.open_reference(path)

    # views --------------------------------------------------------------
    def _on_status(self, msg: str, level: str):
        self.status_label.setText(msg)
        self.status_label.setStyleSheet(STATUS_STYLE.get(level, ""))

    def _on_args(self, args):
        text = join_args(args)
        try:
            same = split_args(self.args_text()) == list(args)
        except ValueError:
            same = False
        if not same:
            self.args_edit.setPlainText(text)
        self.hkl_edit.setText(self.controller.hkl_of(args) or "")

    def _on_started(self):
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def _on_finished(self, ok: bool):
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_rendered(self):
        lines = self.controller.model.hkl_lines()
        self.hkl_info_label.setText("\n".join(lines) if lines else "(not rendered yet)")
        self.device_combo.setCurrentText(self.controller.model.device)
        self.dtype_combo.setCurrentText(self.controller.model.dtype)
        self._on_overlay()
        self.metrics_label.setText("")

    def _on_overlay(self):
        legend = self.controller.model.fallback_legend()
        fb = self.controller.model.fallback
        if not legend:
            self.legend_label.setText("")
            return
        rows = []
        for e in legend:
            rows.append(
                f"<tr><td><span style='background-color:{e['colour']};'>&nbsp;&nbsp;&nbsp;&nbsp;</span></td>"
                f"<td>{html.escape(e['text'])}</td><td align='right'>{e['pixels']:,} px</td></tr>")
        total = int(fb.counts.sum(dtype="int64")) if fb is not None else 0
        n_eval = fb.evaluations_per_pixel * fb.counts.size if fb is not None and fb.evaluations_per_pixel else 0
        foot = f"{total:,} of {n_eval:,} evaluations used default_F" if n_eval else f"{total:,} evaluations used default_F"
        self.legend_label.setText(f"<table cellspacing='3'>{''.join(rows)}</table><small>{foot}</small>")

    def _on_compared(self, cmp):
        m = cmp.metrics
        keys = [("correlation", "correlation", "{:.6f}"), ("rmse", "RMSE", "{:.4g}"),
                ("sum_ratio", "sum ratio (sim/ref)", "{:.6f}"), ("max_abs_diff", "max |difference|", "{:.4g}")]
        lines = [f"reference: {Path(cmp.path).name}"]
        for k, label, fmt in keys:
            if k in m:
                lines.append(f"{label}: {fmt.format(m[k])}")
        self.metrics_label.setText("\n".join(lines))


class TapWidget(QWidget):
    """The tap table of the last clicked pixel, the selection and export."""

    def __init__(self, controller: InspectorController, parent=None):
        super().__init__(parent)
        self.controller = c = controller
        self.setObjectName("bragg_inspector_tap")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        box = QGroupBox("Pixel tap (click the image; shift-click selects)")
        v = QVBoxLayout(box)
        self.pixel_label = _wrap_label("no pixel tapped yet")
        self.pixel_label.setObjectName("pixel_label")
        self.summary_label = _wrap_label("")
        self.summary_label.setObjectName("summary_label")
        v.addWidget(self.pixel_label)
        v.addWidget(self.summary_label)
        self.table = QTableWidget(0, 0)
        self.table.setObjectName("tap_table")
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setMinimumHeight(150)
        v.addWidget(self.table, 1)
        lay.addWidget(box, 3)

        box = QGroupBox("Selection")
        v = QVBoxLayout(box)
        self.selection_list = QListWidget()
        self.selection_list.setMinimumHeight(60)
        v.addWidget(self.selection_list)
        row = QGridLayout()
        self.remove_button = QPushButton("Remove")
        self.clear_button = QPushButton("Clear")
        self.export_folder_button = QPushButton("Export to folder…")
        self.export_bundle_button = QPushButton("Export bundle")
        self.export_bundle_button.setToolTip("write the selected taps into a fresh evidence bundle folder")
        for i, b in enumerate((self.remove_button, self.clear_button, self.export_folder_button,
                               self.export_bundle_button)):
            row.addWidget(b, i // 2, i % 2)
        v.addLayout(row)
        self.export_label = _wrap_label("")
        self.export_label.setObjectName("export_label")
        v.addWidget(self.export_label)
        lay.addWidget(box, 1)

        self.remove_button.clicked.connect(self._remove)
        self.clear_button.clicked.connect(c.clear_selection)
        self.export_folder_button.clicked.connect(self._export_folder)
        self.export_bundle_button.clicked.connect(lambda: self.export(None))
        c.tapped.connect(self.show_tap)
        c.selection_changed.connect(self._on_selection)
        c.rendered.connect(self._on_rendered)

    def show_tap(self, rec):
        self.pixel_label.setText(rec.info_line())
        self.summary_label.setText(rec.summary)
        cols = rec.columns
        t = self.table
        t.setUpdatesEnabled(False)
        try:
            t.setRowCount(0)
            t.setColumnCount(len(cols))
            t.setHorizontalHeaderLabels(cols)
            t.setRowCount(len(rec.rows))
            brush = QBrush(DEFAULT_F_ROW_COLOUR)
            for i, (row, shown) in enumerate(zip(rec.rows, rec.table())):
                hi = shown["default_F"]
                for j, col in enumerate(cols):
                    item = QTableWidgetItem(format_cell(col, row.get(col)))
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    if hi:
                        item.setBackground(brush)
                        item.setToolTip("F_cell came from default_F")
                    t.setItem(i, j, item)
        finally:
            t.setUpdatesEnabled(True)

    def table_text(self) -> list[dict[str, str]]:
        """The table's cells as text (for tests and copy/paste)."""
        t = self.table
        cols = [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())]
        return [{c: t.item(i, j).text() for j, c in enumerate(cols)} for i in range(t.rowCount())]

    def row_highlighted(self, i: int) -> bool:
        item = self.table.item(i, 0)
        return item is not None and item.background().color().alpha() > 0 and \
            item.background().style() != Qt.BrushStyle.NoBrush

    def _on_rendered(self):
        self.table.setRowCount(0)
        self.pixel_label.setText("no pixel tapped yet")
        self.summary_label.setText("")

    def _on_selection(self):
        self.selection_list.clear()
        for (s, f), rec in self.controller.model.selection.items():
            item = QListWidgetItem(f"({s}, {f})  {rec.label}  value {rec.value:.4g}" if rec.value is not None
                                   else f"({s}, {f})  {rec.label}")
            item.setData(Qt.ItemDataRole.UserRole, (s, f))
            self.selection_list.addItem(item)

    def _remove(self):
        for item in self.selection_list.selectedItems():
            self.controller.deselect(tuple(item.data(Qt.ItemDataRole.UserRole)))

    def _export_folder(self):
        folder = QFileDialog.getExistingDirectory(self, "Export taps into folder")
        if folder:
            self.export(folder)

    def export(self, folder):
        paths = self.controller.export(folder)
        if paths:
            self.export_label.setText("written:\n" + "\n".join(str(p) for p in paths))
        return paths
