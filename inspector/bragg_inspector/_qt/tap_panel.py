"""The "Bragg pixel tap" dock panel (magicgui): the table of the clicked pixel
(grouped by reflection, filtered to default_F), its Sensitivity view (the
engine's dI/dp, computed in the worker thread while the view is shown), the
selection and export."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton, RadioButtons, Select, Table
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QBrush, QColor, QKeySequence
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QHeaderView,
    QSizePolicy,
    QStyledItemDelegate,
    QTableWidgetItem,
)

from ..controller import KEY_HELP, KEYS, controller_for
from ..model import REFLECTION_COLUMNS, SENSITIVITY_COLUMNS, format_cell, sensitivity_view, tap_view
from ..readout import table_tsv
from .simulation_panel import fit_label, heading, row, wrapped_label

if TYPE_CHECKING:
    import napari

__all__ = ["TapPanel"]

DEFAULT_F_ROW_COLOUR = QColor(255, 140, 0, 90)
#: the views of the clicked pixel
VIEWS = ("Evaluations", "Sensitivity")


def _text_table(name: str, min_height: int) -> Table:
    """A read-only table without row numbers whose columns fit their contents."""
    table = Table(name=name)
    t = table.native
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.verticalHeader().setVisible(False)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    t.setMinimumHeight(min_height)
    # Qt's plain delegate: the cells show the text as written (magicgui's reformats numbers)
    t.setItemDelegate(QStyledItemDelegate(t))
    return table


def _fill(table: Table, cols: list[str], rows: list[dict[str, str]], left: tuple[str, ...] = ()) -> None:
    """Write text rows into a table (numbers right-aligned, the ``left`` columns left-aligned)."""
    t = table.native
    t.setUpdatesEnabled(False)
    try:
        t.clear()
        t.setColumnCount(len(cols))
        t.setHorizontalHeaderLabels(cols)
        t.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                item = QTableWidgetItem(r.get(col, ""))
                side = Qt.AlignmentFlag.AlignLeft if col in left else Qt.AlignmentFlag.AlignRight
                item.setTextAlignment(side | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(i, j, item)
    finally:
        t.setUpdatesEnabled(True)
    # wide enough for every column, so that the dock grows instead of hiding dI/dp behind a scroll bar
    t.resizeColumnsToContents()
    width = t.horizontalHeader().length() + t.verticalScrollBar().sizeHint().width() + 2 * t.frameWidth() + 4
    t.setMinimumWidth(min(width, 900))


def _cells(table: Table) -> list[dict[str, str]]:
    t = table.native
    cols = [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())]
    return [{c: t.item(i, j).text() for j, c in enumerate(cols)} for i in range(t.rowCount())]


class _KeyActions(QObject):
    """Runs an action when a watched widget gets a key press matching a standard key."""

    def __init__(self, actions: dict):
        super().__init__()
        self._actions = actions

    def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.KeyPress:
            for key, action in self._actions.items():
                if event.matches(key):
                    action()
                    return True
        return False


class TapPanel(Container):
    """The tap table of the last clicked pixel, the selection and export.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer (napari passes it); the panel uses its shared controller (:func:`controller_for`).

    Attributes
    ----------
    controller : InspectorController
        The viewer's controller.
    table : magicgui.widgets.Table
        The tap table.
    selection_list : magicgui.widgets.Select
        The selected pixels.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self.controller = c = controller_for(viewer)
        self.pixel_label = wrapped_label("no pixel tapped yet", name="pixel_label")
        self.summary_label = wrapped_label(name="summary_label")
        self.group_check = CheckBox(text="group by (h0,k0,l0)", value=False)
        self.default_only_check = CheckBox(text="default_F only", value=False)
        self.caption_label = Label(value="", name="caption_label")
        self.table = Table(name="tap_table")
        t = self.table.native
        t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        t.setMinimumHeight(150)
        t.setToolTip("Ctrl+C copies the table (or the selected rows) as tab-separated text")
        self.selection_list = Select(choices=self._selection_choices, allow_multiple=True, name="selection_list",
                                     tooltip="double-click: go to the pixel and show its table; Delete: remove it")
        self.selection_list.native.setMinimumHeight(60)
        self.remove_button = PushButton(text="Remove")
        self.clear_button = PushButton(text=f"Clear ({KEYS['clear']})")
        self.export_dir = FileEdit(mode="d", nullable=True, name="export_folder", label="folder")
        self.export_folder_button = PushButton(text="Export to folder")
        self.export_bundle_button = PushButton(text=f"Export bundle ({KEYS['export']})",
                                               tooltip="write the selected taps into a fresh evidence bundle")
        self.export_label = wrapped_label(name="export_label")
        self.view_choice = RadioButtons(choices=VIEWS, value=VIEWS[0], orientation="horizontal", name="view",
                                        tooltip="Sensitivity: the engine's dI/dp of the clicked pixel for every "
                                                "differentiable parameter (about a second per pixel, computed "
                                                "in the background while this view is shown)")
        self.evaluations_box = Container(widgets=[row(self.group_check, self.default_only_check, self.caption_label),
                                                  self.table], labels=False, name="evaluations_box")
        self.sensitivity_label = wrapped_label("", name="sensitivity_label")
        self.sensitivity_table = _text_table("sensitivity_table", 380)
        self.sensitivity_table.native.setToolTip("dI/dp in photons per unit of the parameter; relative change = "
                                                 "dI/dp × step / I")
        self.reflection_table = _text_table("reflection_table", 120)
        self.reflection_label = wrapped_label("", name="reflection_label")
        self.reflection_table.native.setToolTip("the structure factors this pixel depends on most (dI/dF in "
                                                "photons per electron)")
        self.not_differentiable_label = wrapped_label("", name="not_differentiable_label")
        self.sensitivity_box = Container(widgets=[self.sensitivity_label, self.sensitivity_table,
                                                  heading("Structure factors (largest |dI/dF| first)"),
                                                  self.reflection_label, self.reflection_table,
                                                  heading("Not differentiable here"), self.not_differentiable_label],
                                         labels=False, name="sensitivity_box")
        self.sensitivity_box.visible = False
        left = Container(widgets=[heading("Pixel tap (click the image; shift-click selects)"), self.pixel_label,
                                  self.summary_label, self.view_choice, self.evaluations_box,
                                  self.sensitivity_box], labels=False)
        right = Container(widgets=[heading("Selection"), self.selection_list,
                                   row(self.remove_button, self.clear_button), self.export_dir,
                                   row(self.export_folder_button, self.export_bundle_button), self.export_label],
                          labels=False)
        super().__init__(widgets=[left, right], layout="horizontal", labels=False, name="bragg_inspector_tap")
        self.native.setObjectName("bragg_inspector_tap")
        self.default_only_check.native.setText("default_F only")  # magicgui turns "_" into " "
        self.native.layout().setStretch(0, 3)
        self.native.layout().setStretch(1, 1)
        right.native.setMaximumWidth(420)  # the table takes the width
        left.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.tooltip = "Shortcuts: " + KEY_HELP + " · Ctrl+C: copy the table · Delete: remove a selected pixel"
        self._record = None
        self._rows: list[dict] = []

        # key events of the table and the list themselves (a QShortcut would need the
        # window to be the active one)
        self._keys = _KeyActions({QKeySequence.StandardKey.Copy: self.copy_table})
        t.installEventFilter(self._keys)
        lw = self.selection_list.native
        self._list_keys = _KeyActions({QKeySequence.StandardKey.Delete: self._remove})
        lw.installEventFilter(self._list_keys)
        lw.itemDoubleClicked.connect(self._on_double_click)

        self.group_check.changed.connect(lambda _v: self._refill())
        self.default_only_check.changed.connect(lambda _v: self._refill())
        self.remove_button.changed.connect(self._remove)
        self.clear_button.changed.connect(c.clear_selection)
        self.export_folder_button.changed.connect(self._export_folder)
        self.export_bundle_button.changed.connect(lambda: self.export(None))
        self.view_choice.changed.connect(self._on_view)
        c.tapped.connect(self.show_tap)
        c.sensitivity_ready.connect(self._on_sensitivity)
        c.sensitivity_failed.connect(self._on_sensitivity_failed)
        c.selection_changed.connect(self._on_selection)
        c.rendered.connect(self._on_rendered)

    # ------------------------------------------------------------------ table
    def show_tap(self, rec):
        """Show a record's pixel line, summary and table.

        Parameters
        ----------
        rec : TapRecord
            The tapped pixel.
        """
        self._record = rec
        text = rec.info_line()
        if rec.source != "engine":
            text += f" — stored table from {rec.source}"
        self.pixel_label.value = text
        self.summary_label.value = rec.summary
        fit_label(self.pixel_label)
        fit_label(self.summary_label)
        self._refill()
        if self.view_choice.value == "Sensitivity":
            self._show_sensitivity()

    def _refill(self):
        rec = self._record
        if rec is None:
            return
        cols, rows, caption = tap_view(rec, self.group_check.value, self.default_only_check.value)
        self._rows = rows
        self.caption_label.value = caption
        t = self.table.native
        t.setUpdatesEnabled(False)
        try:
            # cells written on the QTableWidget itself: magicgui's Table.value setter
            # drops cells whose text is not a Python literal (e.g. "default_F:unlisted")
            t.clear()
            t.setColumnCount(len(cols))
            t.setHorizontalHeaderLabels(cols)
            t.setRowCount(len(rows))
            brush = QBrush(DEFAULT_F_ROW_COLOUR)
            for i, r in enumerate(rows):
                for j, col in enumerate(cols):
                    item = QTableWidgetItem(format_cell(col, r.get(col)))
                    t.setItem(i, j, item)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    if r["default_F"]:
                        item.setBackground(brush)
                        item.setToolTip("F_cell came from default_F")
        finally:
            t.setUpdatesEnabled(True)

    # ------------------------------------------------------------------ sensitivity view
    def show_view(self, name: str) -> None:
        """Show one view of the clicked pixel: ``"Evaluations"`` (the tap table) or ``"Sensitivity"``.

        Parameters
        ----------
        name : str
            One of :data:`VIEWS`; the Sensitivity view starts the pixel's dI/dp in the background.
        """
        self.view_choice.value = name

    def _on_view(self, name):
        sens = name == "Sensitivity"
        self.evaluations_box.visible = not sens
        self.sensitivity_box.visible = sens
        if sens:
            self._show_sensitivity()

    def _show_sensitivity(self):
        rec = self._record
        if rec is None:
            self._sensitivity_message("click a pixel: its dI/dp for every differentiable parameter is shown here")
        elif rec.sensitivity is not None:
            self._on_sensitivity(rec)
        elif rec.source != "engine":
            self._sensitivity_message(f"no sensitivity for a table stored in {rec.source}: render, then click")
        else:
            self._sensitivity_message(f"computing dI/dp of pixel ({rec.slow}, {rec.fast})…")
            self.controller.compute_sensitivity(rec)

    def _sensitivity_message(self, text: str) -> None:
        self.sensitivity_label.value = text
        fit_label(self.sensitivity_label)
        for table in (self.sensitivity_table, self.reflection_table):
            table.native.clear()
            table.native.setRowCount(0)
            table.native.setColumnCount(0)
        self.not_differentiable_label.value = ""

    def _on_sensitivity(self, rec):
        if rec is not self._record or rec.sensitivity is None:
            return
        view = sensitivity_view(rec.sensitivity)
        self.sensitivity_label.value = f"dI/dp of pixel ({rec.slow}, {rec.fast}): {view['caption']}"
        fit_label(self.sensitivity_label)
        _fill(self.sensitivity_table, SENSITIVITY_COLUMNS, view["parameters"], left=("parameter", "unit"))
        _fill(self.reflection_table, REFLECTION_COLUMNS, view["reflections"])
        self.reflection_table.visible = bool(view["reflections"])
        self.reflection_label.value = "" if view["reflections"] else "none: F is not differentiable here (below)"
        self.reflection_label.visible = not view["reflections"]
        self.not_differentiable_label.value = "\n".join(view["not_differentiable"]) or "(none)"
        fit_label(self.not_differentiable_label)

    def _on_sensitivity_failed(self, rec, message: str):
        if rec is self._record:
            self._sensitivity_message(message)

    def sensitivity_text(self) -> list[dict[str, str]]:
        """The Sensitivity table's cells as text, one dict per parameter component.

        Returns
        -------
        list of dict of str to str
            Column header (:data:`SENSITIVITY_COLUMNS`) → cell text.
        """
        return _cells(self.sensitivity_table)

    def reflection_text(self) -> list[dict[str, str]]:
        """The structure-factor table of the Sensitivity view as text.

        Returns
        -------
        list of dict of str to str
            Column header (:data:`REFLECTION_COLUMNS`) → cell text.
        """
        return _cells(self.reflection_table)

    def table_text(self) -> list[dict[str, str]]:
        """The table's cells as text, one dict per row.

        Returns
        -------
        list of dict of str to str
            Column header → cell text.
        """
        return _cells(self.table)

    def row_highlighted(self, i: int) -> bool:
        """Whether a row of the table has the default_F highlight.

        Parameters
        ----------
        i : int
            Row index.

        Returns
        -------
        bool
            True when its first cell has a visible background brush.
        """
        item = self.table.native.item(i, 0)
        return item is not None and item.background().style() != Qt.BrushStyle.NoBrush and \
            item.background().color().alpha() > 0

    def copy_table(self) -> str:
        """Copy the table (the selected rows, or all) to the clipboard as TSV; returns the text.

        Returns
        -------
        str
            The tab-separated text, header line first.
        """
        t = self.table.native
        cols = [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())]
        rows = sorted({ix.row() for ix in t.selectedIndexes()}) or list(range(t.rowCount()))
        text = table_tsv(cols, [[t.item(i, j).text() for j in range(len(cols))] for i in rows])
        QApplication.clipboard().setText(text)
        self.controller._info(f"copied {len(rows)} row(s) of the tap table")
        return text

    def _on_rendered(self):
        self._record = None
        self.table.native.clear()
        self.table.native.setRowCount(0)
        self.table.native.setColumnCount(0)
        self.pixel_label.value = "no pixel tapped yet"
        self.summary_label.value = ""
        self.caption_label.value = ""
        self._sensitivity_message("click a pixel: its dI/dp for every differentiable parameter is shown here")

    # ------------------------------------------------------------------ selection
    def _selection_choices(self, _widget=None) -> list[tuple[str, tuple[int, int]]]:
        """The selected pixels as (text, pixel); a callable, so that napari's
        ``reset_choices`` on layer changes rebuilds the list from the model."""
        out = []
        for (s, f), rec in self.controller.model.selection.items():
            text = f"({s}, {f})  {rec.label}" + (f"  value {rec.value:.4g}" if rec.value is not None else "")
            out.append((text, (s, f)))
        return out

    def _on_selection(self):
        with self.selection_list.changed.blocked():
            self.selection_list.reset_choices()

    def _remove(self, *_):
        for pixel in list(self.selection_list.value):
            self.controller.deselect(tuple(pixel))

    def _on_double_click(self, item):
        lw = self.selection_list.native
        row_i = lw.row(item)
        choices = list(self.selection_list.choices)
        if 0 <= row_i < len(choices):
            self.controller.jump_to(tuple(choices[row_i]))

    def _export_folder(self, *_):
        folder = self.export_dir.value
        if folder is None or str(folder) in ("", "."):
            self.controller.report_error("choose a folder first", "Export")
            return []
        return self.export(folder)

    def export(self, folder):
        """Export the selection (:meth:`InspectorController.export`) and list the written files.

        Parameters
        ----------
        folder : str or Path or None
            A folder, an existing evidence bundle, or None for a fresh bundle.

        Returns
        -------
        list of Path
            The written files; empty on failure.
        """
        paths = self.controller.export(folder)
        if paths:
            self.export_label.value = "written:\n" + "\n".join(str(p) for p in paths)
            fit_label(self.export_label)
        return paths
