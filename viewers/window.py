"""The viewer's window for a training process, drawn in a render process of its own.

``Monitor(viewer=True)`` in a script opens one. A thread of the training process sends each
probe's newest frame when it changed, at most ``fps`` times a second; the window (keys, mouse
readouts, PNG and MP4 recording, as ``probescope view``) runs its own event loop in the render
process, so training never draws, and a window that is closed, or a display that goes away,
leaves training as it was.
"""

from __future__ import annotations

import contextlib
import logging

from probescope.viewers.backend import NO_DISPLAY, ViewerUnavailable, has_display
from probescope.viewers.process import (
    FedView,
    RenderError,
    RenderProcess,
    SentFrames,
    lower_priority,
    receive_out_of_band,
)

log = logging.getLogger("probescope")


class WindowView(FedView):
    """Panels for every probe of ``source`` in a window of a render process.

    Made on the training process's side; ``wait_ready()`` returns once the window is open
    (``error`` says why when it could not). ``closed`` turns True when the window is closed
    or its process ends.
    """

    thread_name = "probescope-window"

    def __init__(
        self,
        source,
        *,
        fps: float = 30.0,
        size: tuple[int, int] | None = None,
        columns: int | None = None,
        probes=None,
    ):
        super().__init__(source, fps, probes)
        out_dir = getattr(source, "out_dir", None)
        self._args = ({"size": size, "columns": columns, "probes": probes}, self.fps, out_dir)
        self.backend: str | None = None  # the window's vispy backend, once open
        self.window_shown: dict[str, int] | None = None  # what the window said it showed last
        self._thread.start()

    def _open(self) -> None:
        if not has_display():  # say so now, not after starting a process to find out
            raise ViewerUnavailable(NO_DISPLAY)
        self._renderer = RenderProcess(_window, self._specs(), *self._args, name=self.thread_name)
        _, self.backend = self._renderer.receive()

    def _tick(self, last: bool) -> bool:
        if not self._renderer.alive():
            return False  # the window was closed
        try:
            frames = self._newest()
            if frames:
                self._renderer.send(frames)
                self.shown.update({name: frame.seq for name, frame in frames.items()})
            if last:
                self._renderer.send(None)
                _, self.window_shown = self._renderer.receive(timeout=10.0)
        except (BrokenPipeError, EOFError, ConnectionError, RenderError):
            return False  # the window's process ended under us: closed
        return True

    def _failed(self, err: Exception) -> None:
        super()._failed(err)
        log.warning("viewer: the window's feed failed (%s); training goes on", self.error)


def _window(conn, specs, viewer_args: dict, fps: float, out_dir) -> None:
    """The render process: open the viewer's window and run its event loop; a timer takes the
    frames received and draws the newest. On None it answers with the frames it showed and
    closes the window; when the pipe closes (the training process ended) or the user closes
    the window, the process ends."""
    lower_priority()
    source = SentFrames(specs, out_dir)
    try:
        from vispy import app

        from probescope.viewers.viewer import Viewer

        viewer = Viewer(source, offscreen=False, fps=fps, **viewer_args)
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", viewer.backend))

    def finish(answer: bool) -> None:
        if answer:
            with contextlib.suppress(Exception):
                viewer.refresh()
                conn.send(("shown", dict(viewer.shown)))
        timer.stop()
        viewer.close()
        app.quit()

    def take_frames(event) -> None:
        try:
            while conn.poll():
                frames = receive_out_of_band(conn)
                if frames is None:
                    finish(answer=True)
                    return
                source.frames.update(frames)
        except (EOFError, OSError):
            finish(answer=False)
            return
        viewer.refresh()

    timer = app.Timer(1.0 / fps, connect=take_frames, start=True)
    viewer.canvas.events.close.connect(lambda event: app.quit())
    viewer.canvas.show()
    app.run()
