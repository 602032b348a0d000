"""What writing an exported GIF costs: probescope's streaming writer against Pillow's ``save_all``.

``python -m benchmarks.gif [--frames 200 2000] [--distinct 40]``: a 2-64-64-7 MLP trains on
blobs7 for 5 x ``--distinct`` steps with a GridProbe map (128 x 128) every 5; its frames are drawn
as ``probescope export`` draws them (768 x 512, halved for the GIF). Then, in a fresh process
per writer and count (so each one's peak memory is its own), that many frames (the recorded
ones over and over) are written to a GIF by:

- ``stream``: ``probescope.gif.GifWriter``, each frame on disk as it comes (only the
  rectangle that changed, with its own colour table);
- ``pillow``: what the export did before, every frame quantized (the same octree, 255
  colours) and kept, then ``save_all`` at the end.

Prints, per writer and count: seconds, frames a second, the file's size and the process's peak
memory above what it held before the first frame, and checks that both files decode to the
same number of frames.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.export import record_run
from probescope import open_run
from probescope.figures import FrameRenderer
from probescope.gif import GifWriter

WRITERS = ("stream", "pillow")


def render_frames(distinct: int, folder: Path) -> np.ndarray:
    """``distinct`` + 1 GridProbe frames of a short training run, drawn and halved as the export does."""
    record = open_run(record_run(distinct + 1, folder)).probe("grid")
    renderer = FrameRenderer(record, size=(768, 512))
    frames = []
    for index in range(len(record)):
        frame = record.frame(index)
        renderer.draw(frame.data, frame.step, frame.epoch)
        image = Image.fromarray(renderer.image())
        frames.append(np.asarray(image.resize((384, 256), Image.Resampling.LANCZOS)))
    return np.stack(frames)


def write(writer: str, frames_path: str, count: int, out: str, queue) -> None:
    """In a child process: write ``count`` frames; report seconds and peak memory growth."""
    frames = np.load(frames_path)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if writer == "stream":
        with GifWriter(out, fps=12) as gif:
            for i in range(count):
                gif.append(frames[i % len(frames)])
    else:
        kept = [
            Image.fromarray(frames[i % len(frames)]).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
            for i in range(count)
        ]
        kept[0].save(
            out, save_all=True, append_images=kept[1:], duration=83, loop=0, optimize=False, disposal=1
        )
    seconds = time.perf_counter() - start
    queue.put((seconds, (_status_kib("VmHWM") - before) / 1024))


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(writer: str, frames_path: Path, count: int, out: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=write, args=(writer, str(frames_path), count, str(out), queue))
    child.start()
    seconds, peak_mib = queue.get()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{writer}: the writing process ended with status {child.exitcode}")
    with Image.open(out) as image:
        decoded = image.n_frames
    return {
        "writer": writer,
        "frames": count,
        "seconds": seconds,
        "fps": count / seconds,
        "file_mib": out.stat().st_size / 2**20,
        "peak_mib": peak_mib,
        "decoded": decoded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gif", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--distinct", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frames = render_frames(args.distinct, folder)
        np.save(folder / "frames.npy", frames)
        print(f"{len(frames)} distinct frames of {frames.shape[2]} x {frames.shape[1]} px")
        print(f"{'writer':>8} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'file MiB':>9} {'peak MiB':>9}")
        for count in args.frames:
            rows = [measure(w, folder / "frames.npy", count, folder / f"{w}-{count}.gif") for w in WRITERS]
            for row in rows:
                print(
                    f"{row['writer']:>8} {row['frames']:>7} {row['seconds']:>8.2f} {row['fps']:>9.1f} "
                    f"{row['file_mib']:>9.1f} {row['peak_mib']:>9.1f}"
                )
            decoded = [row["decoded"] for row in rows]
            if len(set(decoded)) != 1:
                raise RuntimeError(f"{count} frames: the files decode to {decoded} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
