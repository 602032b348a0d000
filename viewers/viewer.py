"""The live viewer: one SceneCanvas, one panel per probe, drawing only the newest frame.

Sources: a :class:`MonitorSource` reads the monitor's rings in the training process
(``latest()`` never blocks the writer); a :class:`RunSource` reads a run directory, either
following it while it is written (``probescope view RUN --follow``) or replaying a finished
run on a timeline of its recorded steps.

Keys: space pauses the display (never training) or, in a replay, plays and pauses; s saves
a PNG; r starts and stops recording an MP4; q closes; left and right step a replay.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from probescope.viewers.backend import use_backend

log = logging.getLogger("probescope")


class MonitorSource:
    """Frames straight from a live Monitor's rings."""

    def __init__(self, monitor):
        from probescope.viewers.panels import PanelSpec

        self.monitor = monitor
        self.specs = [PanelSpec.of_probe(p) for p in monitor.probes.values()]
        self.out_dir = Path(monitor.writer.path) if monitor.writer is not None else Path.cwd()

    def latest(self, name: str):
        return self.monitor.latest(name)

    def latest_device(self, name: str):
        """The newest completed device frame (CUDA frames only; never syncs), or None."""
        return self.monitor.ring(name).latest_device()

    def upload_path(self) -> str:
        cuda = any(self.latest_device(spec.name) is not None for spec in self.specs)
        return "CUDA frames: interop when the GL context shares their GPU, else host" if cuda else "host"


class RunSource:
    """Frames from a run directory; ``follow`` re-reads it for new frames."""

    def __init__(self, path: str | Path, follow: bool = False):
        from probescope.run import open_run
        from probescope.viewers.panels import PanelSpec

        self.run = open_run(path)
        self.follow = follow
        self.specs = [PanelSpec.of_record(self.run.probe(n)) for n in self.run.probes]
        self.out_dir = Path(path)
        self._steps: dict[str, list[int]] = {}  # a replay reads each probe's steps once

    def latest(self, name: str):
        record = self.run.probe(name)
        if self.follow:
            record.refresh()
        for _ in range(3):
            try:
                return record.frame(len(record) - 1) if len(record) else None
            except FileNotFoundError:  # moved aside since the listing (a resumed run supersedes)
                record.refresh()
        return None

    def steps(self, name: str) -> list[int]:
        if name not in self._steps:
            self._steps[name] = self.run.probe(name).steps()
        return self._steps[name]

    def timeline(self) -> list[int]:
        """Every recorded step of any probe, in order."""
        return sorted({s for spec in self.specs for s in self.steps(spec.name)})

    def at_step(self, name: str, step: int):
        """The newest frame of ``name`` recorded at or before ``step`` (None before its first)."""
        record = self.run.probe(name)
        steps = self.steps(name)
        index = int(np.searchsorted(steps, step, side="right")) - 1
        return record.frame(index) if index >= 0 else None

    def upload_path(self) -> str:
        return "host"


class RunsSource:
    """Several runs side by side (seeds, settings): one row of panels per run, each panel
    named ``<run> · <probe>``; a replay steps every run through the same steps."""

    SEPARATOR = " · "

    def __init__(self, paths, follow: bool = False, probes: Iterable[str] | None = None):
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("RunsSource: give at least one run directory")
        self.sources = [RunSource(p, follow=follow) for p in paths]
        labels = [p.name or str(p) for p in paths]
        if len(set(labels)) < len(labels):  # same folder names under different parents
            labels = [f"{i}:{label}" for i, label in enumerate(labels)]
        self.labels = labels
        wanted = None if probes is None else set(probes)
        self._where: dict[str, tuple[RunSource, str]] = {}
        self.specs = []
        for label, source in zip(labels, self.sources, strict=True):
            for spec in source.specs:
                if wanted is not None and spec.name not in wanted:
                    continue
                name = f"{label}{self.SEPARATOR}{spec.name}"
                self._where[name] = (source, spec.name)
                self.specs.append(dataclasses.replace(spec, name=name))
        if wanted is not None:
            unknown = wanted - {inner for _, inner in self._where.values()}
            if unknown:
                raise ValueError(f"RunsSource: no run has the probes {sorted(unknown)}")
        owners = [owner for owner, _ in self._where.values()]
        self.columns = max(sum(owner is src for owner in owners) for src in self.sources)  # panels a row
        self.out_dir = paths[0]

    def shared_axes(self) -> list[list[str]]:
        """Panels of the same probe in different runs: drawn on the same axes, so that runs
        compare at a glance."""
        groups: dict[str, list[str]] = {}
        for name, (_, inner) in self._where.items():
            groups.setdefault(inner, []).append(name)
        return [names for names in groups.values() if len(names) > 1]

    def latest(self, name: str):
        source, inner = self._where[name]
        return source.latest(inner)

    def steps(self, name: str) -> list[int]:
        source, inner = self._where[name]
        return source.steps(inner)

    def timeline(self) -> list[int]:
        return sorted({s for name in self._where for s in self.steps(name)})

    def at_step(self, name: str, step: int):
        source, inner = self._where[name]
        return source.at_step(inner, step)

    def upload_path(self) -> str:
        return "host"


class Viewer:
    """Panels for every probe of ``source`` on one canvas.

    ``offscreen=True`` renders through EGL (tests, exports, headless machines); otherwise a
    window opens (``run()`` drives it, or ``pump()`` from a training loop).
    """

    def __init__(
        self,
        source,
        *,
        offscreen: bool = False,
        size: tuple[int, int] | None = None,
        columns: int | None = None,
        log_loss: bool = True,
        fps: float = 60.0,
        probes: Iterable[str] | None = None,
    ):
        self.backend = use_backend(offscreen)
        from vispy import scene

        from probescope.viewers.panels import LossPanel, panel_class

        self.source, self.offscreen, self.fps = source, offscreen, fps
        specs = [s for s in source.specs if probes is None or s.name in set(probes)]
        if not specs:
            names = ", ".join(s.name for s in source.specs) or "none"
            raise ValueError(f"the viewer has no probe to show (the probes: {names})")
        columns = columns or getattr(source, "columns", None) or min(len(specs), 3)
        rows = math.ceil(len(specs) / columns)
        size = size or (min(560 * columns, 1680), min(460 * rows, 1380))
        self.canvas = scene.SceneCanvas(
            title="probescope", size=size, show=not offscreen, bgcolor="white", keys=None, resizable=True
        )
        grid = self.canvas.central_widget.add_grid(margin=6)
        self.panels = {}
        for i, spec in enumerate(specs):
            row, col = divmod(i, columns)
            kind = panel_class(spec.kind)
            extra = {"log_y": log_loss} if kind is LossPanel else {}
            self.panels[spec.name] = kind(grid, spec, row, col, **extra)
        self.shown: dict[str, int] = {}  # probe -> seq of the frame on screen
        self.paused = self.closed = False
        self.recording = None
        self._recording_path: Path | None = None
        self._last_pump = 0.0
        self.timeline: list[int] = source.timeline() if hasattr(source, "timeline") else []
        self.position = len(self.timeline) - 1
        self.playing = False
        self.canvas.events.key_press.connect(self._on_key)
        self.canvas.events.mouse_move.connect(self._on_mouse)
        self.canvas.events.close.connect(self._on_close)
        log.info("viewer: %s backend, %s upload", self.backend, source.upload_path())

    # ---- frames -------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Show the newest frame of every probe (unless paused); True if anything changed."""
        if self.paused or self.closed:
            return False
        changed = False
        for name, panel in self.panels.items():
            if self._refresh_from_device(name, panel):
                changed = True
                continue
            frame = self.source.latest(name)
            if frame is None or self.shown.get(name) == frame.seq:
                continue
            panel.update(frame.data, frame.step, frame.epoch)
            self.shown[name] = frame.seq
            changed = True
        if changed:
            self._after_change()
        return changed

    def _refresh_from_device(self, name: str, panel) -> bool:
        """A map panel of a live CUDA run takes its newest frame from the device ring."""
        if not hasattr(panel, "update_device") or not hasattr(self.source, "latest_device"):
            return False
        frame = self.source.latest_device(name)
        if frame is None or "rgba" not in frame.tensors or self.shown.get(name) == frame.seq:
            return False
        panel.update_device(frame.tensors["rgba"], frame.step, frame.epoch, frame.tensors.get("hyperplanes"))
        self.shown[name] = frame.seq
        return True

    def upload_paths(self) -> dict[str, str]:
        """How each map panel's frames reach its texture (after its first frame)."""
        return {name: p.upload_path for name, p in self.panels.items() if hasattr(p, "upload_path")}

    def show_step(self, step: int) -> None:
        """Replay: show every probe's newest frame at or before ``step``. A panel that draws
        its frames' history (statistics, checkpoints) is first given the recorded frames it
        has not seen since its last one (from the start when the replay went back), so a
        jump, or a first view at the last step, draws the whole history."""
        for name, panel in self.panels.items():
            frame = self.source.at_step(name, step)
            if frame is None or self.shown.get(name) == frame.seq:
                continue
            if panel.accumulates:
                steps = self.source.steps(name)
                last = panel.step if panel.step is not None and panel.step <= frame.step else -math.inf
                start, stop = bisect.bisect_right(steps, last), bisect.bisect_left(steps, frame.step)
                for earlier in steps[start:stop]:  # recorded after the last one shown, before this
                    missed = self.source.at_step(name, earlier)
                    panel.update(missed.data, missed.step, missed.epoch)
            panel.update(frame.data, frame.step, frame.epoch)
            self.shown[name] = frame.seq
        self._after_change()

    def go_to(self, position: int) -> int:
        """Replay: move to timeline position ``position`` (clamped); returns its step."""
        if not self.timeline:
            raise ValueError("this viewer has no recorded timeline to step through")
        self.position = max(0, min(position, len(self.timeline) - 1))
        step = self.timeline[self.position]
        self.show_step(step)
        return step

    def _after_change(self) -> None:
        self._share_axes()
        if self.recording is not None:
            self._append_recording()
        if not self.offscreen:
            self.canvas.update()

    def _share_axes(self) -> None:
        """Give the panels of one probe in several runs the union of their ranges."""
        for names in getattr(self.source, "shared_axes", list)():
            panels = [self.panels[n] for n in names if n in self.panels and self.panels[n].step is not None]
            if len(panels) < 2:
                continue
            rects = [p.view.camera.rect for p in panels]
            x = (min(r.left for r in rects), max(r.right for r in rects))
            y = (min(r.bottom for r in rects), max(r.top for r in rects))
            for panel in panels:
                panel.set_range(x, y)

    def render(self) -> np.ndarray:
        """The canvas as an (H, W, 4) uint8 array."""
        return self.canvas.render(alpha=True)

    # ---- keys ---------------------------------------------------------------------------
    def save_png(self, path: str | Path | None = None) -> Path:
        from PIL import Image

        steps = [p.step for p in self.panels.values() if p.step is not None]
        path = Path(path or self.source.out_dir / f"view_step{max(steps, default=0):07d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.render()).save(path)
        log.info("viewer: saved %s", path)
        return path

    def toggle_recording(self, path: str | Path | None = None) -> Path | None:
        """Start recording every displayed change to an MP4, or stop and return its path."""
        import imageio.v2 as imageio

        if self.recording is not None:
            self.recording.close()
            self.recording, done = None, self._recording_path
            log.info("viewer: recorded %s", done)
            return done
        path = Path(path or self.source.out_dir / f"view_{time.strftime('%Y%m%d-%H%M%S')}.mp4")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.recording = imageio.get_writer(path, format="FFMPEG", mode="I", fps=min(self.fps, 30),
                                            codec="libx264", pixelformat="yuv420p", macro_block_size=16,
                                            ffmpeg_log_level="error")  # fmt: skip
        self._recording_path = path
        self._append_recording()
        return None

    def _append_recording(self) -> None:
        image = self.render()[..., :3]
        h, w = (image.shape[0] // 16) * 16, (image.shape[1] // 16) * 16
        self.recording.append_data(np.ascontiguousarray(image[:h, :w]))

    def toggle_confusion(self) -> list[str]:
        """Key ``c``: every classification prediction panel shows its confusion matrix instead
        of its predictions, or its predictions again; returns the panels that switched."""
        switched = [
            n
            for n, panel in self.panels.items()
            if hasattr(panel, "toggle_confusion") and panel.toggle_confusion()
        ]
        if switched:
            self._after_change()
        return switched

    def _on_key(self, event) -> None:
        key = event.key.name if event.key is not None else event.text
        if key == "Space":
            if self.timeline and not getattr(self.source, "follow", True):
                self.playing = not self.playing
            else:
                self.paused = not self.paused
        elif key in ("S", "s"):
            self.save_png()
        elif key in ("R", "r"):
            self.toggle_recording()
        elif key in ("C", "c"):
            self.toggle_confusion()
        elif key in ("Q", "q", "Escape"):
            self.close()
        elif key == "Right" and self.timeline:
            self.go_to(self.position + 1)
        elif key == "Left" and self.timeline:
            self.go_to(self.position - 1)

    def _on_mouse(self, event) -> None:
        """The pointer moved: the panel under it says what is there, in its caption."""
        changed = False
        for panel in self.panels.values():
            changed |= panel.point_at(event.pos)
        if changed and not self.offscreen:
            self.canvas.update()

    # ---- lifetime -----------------------------------------------------------------------
    def _on_close(self, event=None) -> None:
        self.closed = True
        if self.recording is not None:
            self.toggle_recording()

    def close(self) -> None:
        if not self.closed:
            self._on_close()
            self.canvas.close()

    def pump(self) -> None:
        """From a training loop: at most ``fps`` times a second, draw the newest frames and
        let the window handle its events. Cheap when nothing is due."""
        now = time.perf_counter()
        if self.closed or now - self._last_pump < 1.0 / self.fps:
            return
        self._last_pump = now
        from vispy import app

        self.refresh()
        app.process_events()

    def run(self, replay_fps: float = 10.0) -> None:
        """Open the window and draw until it is closed: live sources at ``fps``; a replay
        plays its timeline at ``replay_fps`` frames per second when space is pressed."""
        from vispy import app

        if self.timeline and not getattr(self.source, "follow", True):
            self.go_to(0)
            self.playing = True

            def tick(event) -> None:
                if self.playing and self.position < len(self.timeline) - 1:
                    self.go_to(self.position + 1)

            self._timer = app.Timer(1.0 / replay_fps, connect=tick, start=True)
        else:
            self._timer = app.Timer(1.0 / self.fps, connect=lambda event: self.refresh(), start=True)
        self.canvas.show()
        app.run()


class GLFrameRenderer:
    """One probe's panel offscreen, with the interface of the matplotlib FrameRenderer:
    ``draw(data, step, epoch)`` then ``image()`` (H, W, 3 uint8). For the exporters."""

    def __init__(self, record, *, size: tuple[int, int] = (768, 512)):
        self.viewer = Viewer(_RecordSource(record), offscreen=True, size=size, columns=1)
        self.panel = self.viewer.panels[record.name]

    def draw(self, data: dict[str, np.ndarray], step: float, epoch: float) -> None:
        self.panel.update(data, step, epoch)

    def image(self) -> np.ndarray:
        return self.viewer.render()[..., :3].copy()

    def close(self) -> None:
        self.viewer.close()


class _RecordSource:
    def __init__(self, record):
        from probescope.viewers.panels import PanelSpec

        self.specs = [PanelSpec.of_record(record)]
        self.out_dir = Path.cwd()

    def latest(self, name: str):
        return None

    def upload_path(self) -> str:
        return "host"
