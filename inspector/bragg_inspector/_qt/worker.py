"""Renders in a worker thread (``napari.qt.threading``), progress and results
delivered on the main thread."""

from __future__ import annotations

import time

from qtpy.QtCore import QEvent, QEventLoop, QObject, QTimer, Signal

__all__ = ["QtRunner", "on_window_close"]


class _CloseWatcher(QObject):
    """Calls ``callback()`` once when the watched window has closed: after a close event the window's
    own handler accepted (napari may ask "are you sure?" and keep it open), or when it is deleted."""

    def __init__(self, window, callback):
        super().__init__(window)
        self._callback = callback
        self._window = window
        window.installEventFilter(self)
        window.destroyed.connect(self._fire)

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close:
            QTimer.singleShot(0, self._after_close)  # once the window's closeEvent has decided
        return False

    def _after_close(self):
        try:
            still_open = self._window.isVisible()
        except RuntimeError:  # already deleted
            still_open = False
        if not still_open:
            self._fire()

    def _fire(self, *_):
        if self._callback is not None:
            callback, self._callback = self._callback, None
            callback()


def on_window_close(viewer, callback) -> None:
    """Call ``callback()`` once the viewer's window has closed (a close it accepted, or its deletion).

    Parameters
    ----------
    viewer : napari.Viewer
        A viewer with a Qt window.
    callback : callable
        Called without arguments, once.
    """
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if window is not None:
        window._bragg_close_watcher = _CloseWatcher(window, callback)


class _Bridge(QObject):
    progressed = Signal(int, int)


class QtRunner:
    """The controller's runner in a Qt application (see ``SyncRunner``).

    Takes no arguments; each job runs in a napari worker thread.

    Attributes
    ----------
    progress_interval_s : float
        The fewest seconds between two progress updates sent to the panels (the last one is always sent).
    """

    #: the fewest seconds between two progress updates sent to the panels
    progress_interval_s = 0.05

    def __init__(self) -> None:
        self._workers: set = set()  # kept alive until their thread has finished
        self._running = False
        self._finished_callbacks: list = []

    def start(self, job, on_progress, on_done, on_error) -> None:
        """Run ``job(progress)`` in a worker thread; the callbacks run on the main thread.

        Parameters
        ----------
        job : callable
            Called with a ``progress(done, total)`` function; its result goes to ``on_done``.
        on_progress : callable
            ``on_progress(done, total)``, throttled to :attr:`progress_interval_s`.
        on_done : callable
            Called with the job's result.
        on_error : callable
            Called with the job's exception (or a ``RuntimeError`` when the thread ended without a result).
        """
        from napari.qt.threading import create_worker

        bridge = _Bridge()
        bridge.progressed.connect(on_progress)  # queued: runs on the main thread
        last = {"t": 0.0}

        def progress(done, total):  # worker thread: throttled
            now = time.monotonic()
            if done >= total or now - last["t"] > self.progress_interval_s:
                last["t"] = now
                bridge.progressed.emit(int(done), int(total))

        worker = create_worker(job, progress=progress, _start_thread=False, _ignore_errors=True)
        state = {"ended": False}

        def done(res):
            state["ended"] = True
            on_done(res)

        def failed(exc):
            state["ended"] = True
            on_error(exc)

        def finished():
            self._workers.discard(worker)
            self._running = bool(self._workers)
            if not state["ended"]:  # neither returned nor errored fired
                on_error(RuntimeError("the render thread ended without a result"))
            for cb in list(self._finished_callbacks):
                cb()

        worker.returned.connect(done)
        worker.errored.connect(failed)
        worker.finished.connect(finished)
        worker._bridge = bridge  # lives as long as the worker
        self._workers.add(worker)
        self._running = True
        worker.start()

    def wait(self, timeout, cancel) -> None:
        """Run the event loop until the render's thread has finished; ``cancel()``
        after ``timeout`` seconds.

        Parameters
        ----------
        timeout : float or None
            Seconds before ``cancel`` is called; None: no limit.
        cancel : callable
            Called without arguments when the time is up.
        """
        if not self._running:
            return
        loop = QEventLoop()
        self._finished_callbacks.append(loop.quit)
        timer = None
        if timeout is not None:
            timer = QTimer()
            timer.setSingleShot(True)
            timer.timeout.connect(cancel)
            timer.start(int(timeout * 1000))
        try:
            if self._running:
                loop.exec()
        finally:
            self._finished_callbacks.remove(loop.quit)
            if timer is not None:
                timer.stop()
