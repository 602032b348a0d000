"""Exporters: a recorded run to PNG frames, GIF and MP4, with frames interpolated in between.

Interpolation blends the probe's values, not its pictures: a grid map's probabilities are
blended and coloured again, so an in-between frame is a map a model could have produced.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from probescope.figures import (
    FrameRenderer,
    confusion_figure,
    figure_panel,
    metrics_figure,
    plot_frame,
    small_multiples,
    stats_figure,
)
from probescope.gif import GifWriter
from probescope.kernels import interpolate_frames, probs_to_rgba
from probescope.kernels.interpolate import METHODS, interpolation_weights
from probescope.probes.views import frame_layout, is_own_kind
from probescope.run import ProbeRecord, Run

FORMATS = ("mp4", "gif", "png")


def _blend(record: ProbeRecord, first: dict, second: dict, k: int, method: str) -> list[dict]:
    """The k data dicts between two frames; arrays that cannot be blended come from ``first``.

    ``geometric`` blends arrays that are non-negative in both frames (probabilities, losses,
    scales) and the rest linearly (activations, predictions); a grid's in-between
    probabilities are then normalised again per pixel: a straight line in log-probability
    (pixels where the two frames share no class above 0 are blended linearly); a ``value``
    map's outputs are not probabilities, and are not normalised."""
    if record.kind == "histograms":  # counts blend as the densities they are
        first, second = ({**d, "counts": np.asarray(d["counts"], np.float64)} for d in (first, second))
    blended = [dict(first) for _ in range(k)]
    for key, a in first.items():
        b = second.get(key)
        if b is None or a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
            continue
        how = "linear" if method == "geometric" and (np.any(a < 0) or np.any(b < 0)) else method
        frames = interpolate_frames(torch.from_numpy(a), torch.from_numpy(b), k, how).numpy()
        if (
            how == "geometric"
            and key == "probs"
            and record.kind == "grid"
            and record.config["mode"] != "value"
        ):
            total = frames.sum(axis=-1, keepdims=True)
            # A pixel whose two frames share no class above 0 (saturated softmax) blends linearly.
            linear = np.zeros_like(frames)
            if not np.all(total > 0):
                linear = interpolate_frames(torch.from_numpy(a), torch.from_numpy(b), k, "linear").numpy()
            frames = np.divide(frames, total, out=linear, where=total > 0)
        for i in range(k):
            blended[i][key] = frames[i]
    if record.kind == "grid":
        config = record.config
        palette = torch.from_numpy(record.static["palette"])
        for data in blended:
            value_range = config.get("value_range")
            data["rgba"] = probs_to_rgba(
                torch.from_numpy(data["probs"]),
                config["mode"],
                palette,
                config["class_index"],
                value_range=None if value_range is None else tuple(value_range),
            ).numpy()
    elif record.kind == "neurons":  # the maps are blended, then coloured again
        from probescope.probes.neurons import neuron_mosaic

        for data in blended:
            activations = torch.from_numpy(data["activations"])
            data["rgba"] = neuron_mosaic(activations, float(data["scale"]), record.config["columns"]).numpy()
    return blended


def timeline(
    record: ProbeRecord, interpolate: int = 0, method: str = "linear"
) -> Iterator[tuple[dict, float, float]]:
    """(data, step, epoch) for every recorded frame, with ``interpolate`` frames between each pair."""
    if interpolate < 0:
        raise ValueError(f"interpolate must be >= 0, got {interpolate}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    previous = None
    for frame in record.frames():
        if previous is not None and interpolate:
            weights = interpolation_weights(interpolate, method).numpy()
            between = _blend(record, previous.data, frame.data, interpolate, method)
            for t, data in zip(weights, between, strict=True):
                yield (
                    data,
                    previous.step + t * (frame.step - previous.step),
                    previous.epoch + t * (frame.epoch - previous.epoch),
                )
        yield frame.data, frame.step, frame.epoch
        previous = frame


#: Pictures below which worker processes cost more to start (each imports probescope and
#: matplotlib) than they save: a probe's export runs here.
MIN_PARALLEL = 150


class Painter:
    """Draws a probe's pictures, in order: here, or, with ``jobs`` > 1 and at least
    ``MIN_PARALLEL`` of them, in ``jobs`` worker processes (started at the first such probe,
    kept for the next). A panel that draws the frames before it too (a HistogramProbe's, a
    probe of the user's own kind) and the OpenGL renderer draw here."""

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
        self.jobs = jobs
        self._pool = None

    def pictures(
        self, record: ProbeRecord, items: Iterable[tuple[dict, float, float]], total: int, size, renderer: str
    ) -> Iterator[tuple[np.ndarray, float]]:
        """(picture, step) of each (data, step, epoch) of ``items`` (``total`` of them)."""
        if renderer == "gl":
            from probescope.viewers.viewer import GLFrameRenderer

            drawer = GLFrameRenderer(record, size=size)
        elif renderer == "mpl":
            if self.jobs > 1 and total >= MIN_PARALLEL and not _draws_history(record.kind):
                yield from self._in_workers(record, items, size)
                return
            drawer = FrameRenderer(record, size=size)
        else:
            raise ValueError(f"renderer must be 'mpl' or 'gl', got {renderer!r}")
        for data, step, epoch in items:
            drawer.draw(data, step, epoch)
            yield drawer.image(), step

    def _in_workers(self, record: ProbeRecord, items, size) -> Iterator[tuple[np.ndarray, float]]:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Spawned, not forked: the caller may hold threads (torch's, a Monitor's).
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        window: deque = deque()  # pictures in flight, in order: at most two per worker
        for data, step, epoch in items:
            job = self._pool.submit(
                _draw_in_worker, str(record.run.path), record.name, size, data, step, epoch
            )
            window.append((job, step))
            if len(window) >= 2 * self.jobs:
                job, at = window.popleft()
                yield job.result(), at
        while window:
            job, at = window.popleft()
            yield job.result(), at

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Painter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _draws_history(kind: str) -> bool:
    """Whether a picture of ``kind`` draws the frames before it too (drawn in order, here)."""
    return getattr(figure_panel(kind), "accumulates", False)


_WORKER_RENDERERS: dict[tuple, FrameRenderer] = {}  # in a worker process: one per probe and size


def _draw_in_worker(run_path: str, name: str, size, data: dict, step: float, epoch: float) -> np.ndarray:
    """In a worker process: one picture, by this worker's renderer for the probe."""
    from probescope.run import open_run

    key = (run_path, name, tuple(size))
    drawer = _WORKER_RENDERERS.get(key)
    if drawer is None:
        drawer = _WORKER_RENDERERS[key] = FrameRenderer(open_run(run_path).probe(name), size=size)
    drawer.draw(data, step, epoch)
    return drawer.image()


def export_probe(
    record: ProbeRecord,
    out: str | Path,
    formats: Iterable[str] = ("mp4",),
    *,
    interpolate: int = 0,
    method: str = "linear",
    fps: float = 12.0,
    size: tuple[int, int] = (768, 512),
    gif_scale: float = 0.5,
    progress: bool = False,
    renderer: str = "mpl",
    jobs: int | Painter = 1,
) -> list[Path]:
    """Render one probe's frames once and write each requested format; returns the files.

    ``renderer``: ``"mpl"`` draws matplotlib figures, ``"gl"`` the OpenGL viewer's panel for
    the probe, offscreen through EGL. ``jobs``: worker processes that draw a long export's
    matplotlib pictures (see ``Painter``; in a script, call it under
    ``if __name__ == "__main__":``, as the processes are spawned), or a ``Painter`` to share."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats must be among {FORMATS}, got {unknown}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not 0 < gif_scale <= 1:
        raise ValueError(f"gif_scale must be within (0, 1], got {gif_scale!r}")
    if renderer not in ("mpl", "gl"):
        raise ValueError(f"renderer must be 'mpl' or 'gl', got {renderer!r}")
    if len(record) == 0:
        raise ValueError(f"probe {record.name!r} has no frames to export")
    painter = jobs if isinstance(jobs, Painter) else Painter(jobs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    mp4 = gif = None
    if "mp4" in formats:
        path = out / f"{record.name}.mp4"
        mp4 = imageio.get_writer(
            path,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=16,
            ffmpeg_log_level="error",
        )
        written.append(path)
    if "gif" in formats:
        path = out / f"{record.name}.gif"
        gif = GifWriter(path, fps)
        written.append(path)
    png_dir = out / record.name if "png" in formats else None
    if png_dir is not None:
        png_dir.mkdir(exist_ok=True)
    total = len(record) + max(len(record) - 1, 0) * interpolate
    try:
        pictures = painter.pictures(record, timeline(record, interpolate, method), total, size, renderer)
        for index, (image, step) in enumerate(
            tqdm(pictures, total=total, desc=f"export {record.name}", disable=not progress, leave=False)
        ):
            if mp4 is not None:
                mp4.append_data(image)
            if gif is not None:
                small = image
                if gif_scale != 1.0:
                    small = np.asarray(
                        Image.fromarray(image).resize(
                            (round(image.shape[1] * gif_scale), round(image.shape[0] * gif_scale)),
                            Image.Resampling.LANCZOS,
                        )
                    )
                gif.append(small)
            if png_dir is not None:
                path = png_dir / f"{index:05d}_step{round(step):07d}.png"
                Image.fromarray(image).save(path)
                written.append(path)
    finally:
        if mp4 is not None:
            mp4.close()
        if gif is not None:
            gif.close()
        if painter is not jobs:
            painter.close()
    return written


def export_run(
    run: Run,
    out: str | Path,
    formats: Iterable[str] = ("mp4",),
    *,
    probes: Iterable[str] | None = None,
    interpolate: int = 0,
    method: str = "linear",
    fps: float = 12.0,
    progress: bool = False,
    renderer: str = "mpl",
    jobs: int = 1,
) -> dict[str, list[Path]]:
    """Export every probe (or the named ones) of a run; returns the files per probe. A probe
    drawn over training as a whole, not frame by frame (StatsProbe: see
    ``export_final_pictures``), is left out unless named, which is an error. ``jobs``: worker
    processes for long exports, shared by the probes (see ``export_probe``)."""

    def animated(kind: str) -> bool:
        if renderer == "gl":  # the viewer's panels: its statistics panel grows frame by frame
            return True
        return figure_panel(kind) is not None

    if probes is not None:
        names = list(probes)
        still = [n for n in names if not animated(run.probe(n).kind)]
        if still:
            raise ValueError(
                f"probes {still} have no frame-by-frame picture to animate with renderer {renderer!r}; "
                "export_final_pictures (--final-pictures) draws them over training"
            )
    else:
        names = [n for n, record in run.probes.items() if animated(record.kind)]
    with Painter(jobs) as painter:
        return {
            name: export_probe(
                run.probe(name),
                out,
                formats,
                interpolate=interpolate,
                method=method,
                fps=fps,
                progress=progress,
                renderer=renderer,
                jobs=painter,
            )
            for name in names
            if len(run.probe(name))
        }


def export_final_pictures(run: Run, out: str | Path) -> list[Path]:
    """PNGs of the final state: each probe's last frame, its small multiples, raw grid maps,
    a LossProbe's losses and metrics and a classification PredictionProbe's confusion matrix.

    ``<grid>_final_map.png`` is the last map itself, one pixel per grid point, exactly the
    recorded RGBA; the other pictures are figures with axes and captions.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, record in run.probes.items():
        if not len(record):
            continue
        path = out / f"{name}_final.png"
        if figure_panel(record.kind) is None:  # drawn over training as a whole
            if record.kind == "stats":
                stats_figure(record).savefig(path)
                written.append(path)
            continue
        plot_frame(record).savefig(path)
        written.append(path)
        if getattr(figure_panel(record.kind), "over_training", False):
            continue  # the final picture is the whole run's
        own = is_own_kind(record.kind)
        if own and frame_layout(record.frame(-1).data, record.config.get("views")).picture is None:
            continue  # numbers alone: the final picture is their series over training
        path = out / f"{name}_small_multiples.png"
        small_multiples(record).savefig(path)
        written.append(path)
        if record.kind == "loss":
            path = out / f"{name}_metrics.png"
            metrics_figure(record).savefig(path)
            written.append(path)
        if record.kind == "prediction" and "confusion" in record.frame(-1).data:  # classification
            path = out / f"{name}_confusion.png"
            confusion_figure(record).savefig(path)
            written.append(path)
        if record.kind == "grid":
            path = out / f"{name}_final_map.png"
            Image.fromarray(record.frame(-1).data["rgba"]).save(path)
            written.append(path)
    return written
