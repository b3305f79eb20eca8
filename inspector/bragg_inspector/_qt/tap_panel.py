"""The "Bragg pixel tap" dock panel (magicgui): the table of the clicked pixel
(grouped by reflection, filtered to default_F), the selection and export."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton, Select, Table
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QBrush, QColor, QKeySequence
from qtpy.QtWidgets import QAbstractItemView, QApplication, QHeaderView, QSizePolicy, QTableWidgetItem

from ..controller import KEY_HELP, KEYS, controller_for
from ..model import format_cell, tap_view
from ..readout import table_tsv
from .simulation_panel import fit_label, heading, row, wrapped_label

if TYPE_CHECKING:
    import napari

__all__ = ["TapPanel"]

DEFAULT_F_ROW_COLOUR = QColor(255, 140, 0, 90)


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
        left = Container(widgets=[heading("Pixel tap (click the image; shift-click selects)"), self.pixel_label,
                                  self.summary_label, row(self.group_check, self.default_only_check,
                                                          self.caption_label), self.table], labels=False)
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
        c.tapped.connect(self.show_tap)
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

    def table_text(self) -> list[dict[str, str]]:
        """The table's cells as text, one dict per row.

        Returns
        -------
        list of dict of str to str
            Column header → cell text.
        """
        t = self.table.native
        cols = [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())]
        return [{c: t.item(i, j).text() for j, c in enumerate(cols)} for i in range(t.rowCount())]

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
