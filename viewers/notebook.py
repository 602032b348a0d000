"""The live view in a Jupyter notebook: the viewer's canvas as one image output of the cell.

A window cannot be driven from a notebook cell that trains (the kernel runs the cell, not an
event loop), and a widget that draws when the browser asks (jupyter_rfb) waits until the cell
ends. This view renders the viewer's canvas offscreen (EGL) in a process of its own and, from a
thread here, replaces one output of the cell with the newest picture, at most ``fps`` times a
second and only when a frame changed, while the cell runs; the output keeps the last picture
when training ends, so the saved notebook shows it. Updates go by display id, so they reach the
output from any thread. Where OpenGL cannot render offscreen (no EGL), the exporters'
matplotlib figures stand in.

``Monitor(viewer="notebook")`` (or ``viewer=True`` in a notebook) opens one for its probes;
:func:`watch` follows or replays a run directory the same way.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from probescope.viewers.backend import in_notebook
from probescope.viewers.process import (
    FedView,
    RenderError,
    RenderProcess,
    SentFrames,
    describe,
    lower_priority,
    newest_frames,
    receive_out_of_band,
)

__all__ = ["DEFAULT_FPS", "FigureCanvas", "NotebookView", "RenderError", "in_notebook", "png_bytes", "watch"]

log = logging.getLogger("probescope")

DEFAULT_FPS = 2.0


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3 or 4) uint8 image as PNG, compressed at zlib's fastest level (a picture
    goes out every second or so; its encoding is most of the render process's CPU after the
    drawing)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[..., :3])).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class NotebookView(FedView):
    """Panels for every probe of ``source`` as one image output of the current cell.

    Created on the cell's thread (it displays the output there, with a line saying it waits
    for frames). The canvas lives in a render process (see probescope.viewers.process): the
    view's thread here hands it each probe's newest frame and puts the PNG it returns in the
    output. ``close()`` draws the newest frames once more and stops both. ``until``: asked
    before each drawing; when it returns True the view draws once more and stops (a followed
    run that has ended).
    """

    thread_name = "probescope-notebook"

    def __init__(
        self,
        source,
        *,
        fps: float = DEFAULT_FPS,
        size: tuple[int, int] | None = None,
        columns: int | None = None,
        probes=None,
        until: Callable[[], bool] | None = None,
    ):
        super().__init__(source, fps, probes)
        from IPython.display import display

        self._until = until
        self._viewer_args = {"size": size, "columns": columns, "probes": probes}
        self.renderer: str | None = None  # "gl" (the viewer's canvas) or "figures" (matplotlib)
        self.images = 0  # pictures sent to the output
        self.bytes_sent = 0  # PNG bytes (base64 adds a third on the wire)
        self.seconds = 0.0  # the render process's time on them: upload, draw, read-back, PNG
        self.startup_seconds = 0.0  # starting it, making the canvas, the first picture
        self.handle = display(
            {"text/plain": "probescope: the view shows the first frames as soon as they exist"},
            raw=True,
            display_id=True,
        )
        self._thread.start()

    def _open(self) -> None:
        t0 = time.perf_counter()
        self._renderer = RenderProcess(_render, self._specs(), self._viewer_args, name=self.thread_name)
        kind, payload = self._renderer.receive()
        if kind == "figures":
            log.warning("notebook view: no OpenGL here (%s); drawing matplotlib's figures instead", payload)
        self.renderer = "gl" if kind == "gl" else "figures"
        self._draw()  # the first picture compiles the shaders (seconds on llvmpipe)
        self.startup_seconds, self.seconds = time.perf_counter() - t0, 0.0

    def _done(self) -> bool:
        return self._until is not None and self._until()

    def _tick(self, last: bool) -> bool:
        self._draw()
        return True

    def _draw(self) -> None:
        frames = self._newest()
        if not frames:
            return
        self._renderer.send(frames)
        _, data, seconds = self._renderer.receive()
        self.shown.update({name: frame.seq for name, frame in frames.items()})
        if data is None:  # nothing visible changed
            return
        self.handle.update({"image/png": base64.b64encode(data).decode("ascii")}, raw=True)
        self.images += 1
        self.bytes_sent += len(data)
        self.seconds += seconds

    def _open_failed(self, err: Exception) -> None:
        self._say("could not open", err)

    def _failed(self, err: Exception) -> None:
        self._say("failed", err)

    def _say(self, what: str, err: Exception) -> None:
        self.error = describe(err)
        log.warning("notebook view: %s (%s); training goes on", what, self.error)
        with contextlib.suppress(Exception):
            self.handle.update({"text/plain": f"probescope: the view {what} ({self.error})"}, raw=True)


def _render(conn, specs, viewer_args: dict) -> None:
    """The render process: make the canvas (the viewer's, offscreen; without OpenGL, the
    exporters' figures), then for each batch of frames received, draw and answer with the PNG
    (None when nothing visible changed), until None or the pipe closes."""
    source = SentFrames(specs)
    lower_priority()
    try:
        from probescope.viewers.backend import ViewerUnavailable
        from probescope.viewers.viewer import Viewer

        try:
            canvas = Viewer(source, offscreen=True, **viewer_args)
            conn.send(("gl", None))
        except ViewerUnavailable as err:
            canvas = FigureCanvas(source, **viewer_args)
            conn.send(("figures", str(err)))
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    while True:
        try:
            frames = receive_out_of_band(conn)
        except (EOFError, OSError):
            break
        if frames is None:
            break
        try:
            t0 = time.perf_counter()
            source.frames.update(frames)
            data = png_bytes(canvas.render()) if canvas.refresh() else None
            conn.send(("png", data, time.perf_counter() - t0))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))
            break
    with contextlib.suppress(Exception):
        canvas.close()


class FigureCanvas:
    """The exporters' matplotlib figures of the probes, tiled as the viewer tiles its panels:
    the notebook view's canvas where OpenGL cannot render offscreen (no EGL: macOS, a machine
    without Mesa). Probes without a figure (statistics, checkpoints) are left out. Draws only
    the figures whose frame changed; the interface the view uses of a Viewer."""

    CELL = (560, 460)  # pixels per figure, the viewer's panel size

    def __init__(self, source, *, size=None, columns=None, probes=None):
        from probescope.figures import FrameRenderer, figure_panel

        self.source = source
        specs = [
            s for s in source.specs if figure_panel(s.kind) and (probes is None or s.name in set(probes))
        ]
        if not specs:
            raise ValueError(
                "no probe here has a figure (statistics and checkpoints are drawn by the viewer)"
            )
        self.columns = columns or min(len(specs), 3)
        rows = -(-len(specs) // self.columns)
        cell = (size[0] // self.columns, size[1] // rows) if size else self.CELL
        self.renderers = {spec.name: FrameRenderer(spec, size=cell) for spec in specs}
        self.images: dict[str, np.ndarray] = {}
        self.shown: dict[str, int] = {}  # probe -> seq of the frame drawn
        self._blank = np.full((*cell[::-1], 3), 255, np.uint8)

    def refresh(self) -> bool:
        """Draw the figure of every probe whose newest frame is new; True if any was."""
        frames = newest_frames(self.source, list(self.renderers), self.shown)
        for name, frame in frames.items():
            renderer = self.renderers[name]
            renderer.draw(frame.data, frame.step, frame.epoch)
            self.images[name] = self._fit(renderer.image())
            self.shown[name] = frame.seq
        return bool(frames)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """``image`` cut or padded (white) to the cell's size (a figure's size in pixels is
        rounded from inches)."""
        out = self._blank.copy()
        h, w = min(out.shape[0], image.shape[0]), min(out.shape[1], image.shape[1])
        out[:h, :w] = image[:h, :w]
        return out

    def render(self) -> np.ndarray:
        """The figures tiled in rows of ``columns``, as an (H, W, 3) uint8 array."""
        tiles = [self.images.get(name, self._blank) for name in self.renderers]
        tiles += [self._blank] * (-len(tiles) % self.columns)
        rows = [np.hstack(tiles[i : i + self.columns]) for i in range(0, len(tiles), self.columns)]
        return np.vstack(rows)

    def close(self) -> None:
        self.renderers.clear()


def watch(
    path: str | Path,
    *,
    follow: bool = True,
    fps: float = DEFAULT_FPS,
    timeout: float | None = None,
    **viewer_args,
) -> NotebookView:
    """In a notebook, show a run directory: ``follow`` its newest frames while another process
    trains it (waiting up to ``timeout`` seconds for it to start; None: as long as it takes)
    until it ends, or show its last frames (``follow=False``). Returns the view; ``close()``
    stops following earlier. ``viewer_args``: the Viewer's ``size``, ``columns``, ``probes``."""
    from probescope.run import run_status, wait_for_run
    from probescope.viewers.viewer import RunSource

    if follow:
        wait_for_run(path, timeout)
    until = (lambda: run_status(path) != "running") if follow else None
    view = NotebookView(RunSource(path, follow=follow), fps=fps, until=until, **viewer_args)
    if not follow:
        view.close()  # one picture of the last frames
    return view
