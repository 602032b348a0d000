"""The viewer suite: frames/s of the map panel through each upload path, offscreen (EGL).

Per frame: a new RGBA map goes to the panel's texture, the canvas is drawn and read back
(``render()``, which is what an export or a test sees; a window skips the read-back). Ours:
the viewer's map panel (axes, caption, legend, points). The reference: a bare vispy Image
visual updated with ``set_data`` and read back, nothing else on the canvas. On CUDA, the
"CUDA frames" row starts from a CUDA tensor, as a monitor's device ring holds it, and goes
through the panel's device upload: CUDA-OpenGL interop when the GL context shares the GPU,
else host memory; the row says which, and why.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

CANVAS = (720, 640)


class _Source:
    """One synthetic grid probe whose frames the benchmark hands in directly."""

    def __init__(self, size: int):
        from probescope.kernels import GridSpec, default_palette
        from probescope.viewers.panels import PanelSpec

        grid = GridSpec.rectangle((-1.0, 1.0, -1.0, 1.0), size, size)
        static = {"palette": default_palette(4).numpy(), "us": grid.us().numpy(), "vs": grid.vs().numpy()}
        config = {
            "domain": [-1.0, 1.0, -1.0, 1.0],
            "resolution": [size, size],
            "mode": "region",
            "num_classes": 4,
        }
        self.specs = [PanelSpec("map", "grid", config, static)]
        self.out_dir = None

    def latest(self, name):
        return None

    def upload_path(self) -> str:
        return "host"


def _time(frames: int, draw) -> float:
    draw(0)  # shaders compile on the first draw
    times = []
    for i in range(1, frames + 1):
        t0 = time.perf_counter()
        draw(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(device: torch.device, quick: bool, peaks: dict):
    from vispy import scene

    from probescope.viewers.viewer import Viewer

    frames = 10 if quick else 30
    for size in (512, 1024, 2048):
        rng = np.random.default_rng(size)
        maps = [rng.integers(0, 256, (size, size, 4), dtype=np.uint8) for _ in range(4)]
        maps = [np.concatenate([m[..., :3], np.full((size, size, 1), 255, np.uint8)], -1) for m in maps]
        viewer = Viewer(_Source(size), offscreen=True, size=CANVAS)
        panel = viewer.panels["map"]

        def ours(i, panel=panel, viewer=viewer, maps=maps):
            panel.update({"rgba": maps[i % 4]}, i, 0)
            viewer.render()

        canvas = scene.SceneCanvas(size=CANVAS, show=False, bgcolor="white")
        view = canvas.central_widget.add_view()
        image = scene.visuals.Image(maps[0], parent=view.scene, interpolation="nearest")
        view.camera = scene.PanZoomCamera(aspect=1)
        view.camera.set_range(x=(0, size), y=(0, size), z=(-1, 1))

        def bare(i, image=image, canvas=canvas, maps=maps):
            image.set_data(maps[i % 4])
            canvas.render()

        providers = {"viewer map panel": ours, "bare vispy Image": bare}
        if device.type == "cuda":  # frames as a monitor's device ring holds them
            on_device = [torch.from_numpy(m).to(device) for m in maps]

            def device_frames(i, panel=panel, viewer=viewer, on_device=on_device):
                panel.update_device(on_device[i % 4], i, 0)  # interop, or host with the reason
                viewer.render()

            providers["viewer, CUDA frames"] = device_frames
        row = {
            "op": "viewer offscreen",
            "case": f"{size}² map, canvas {CANVAS[0]}x{CANVAS[1]}",
            "results": {},
        }
        for name, draw in providers.items():
            seconds = _time(frames, draw)
            rate = f"{1.0 / seconds:.1f} frames/s"
            if name == "viewer, CUDA frames":
                rate += f" via {panel.upload_path}"
            row["results"][name] = {"median_s": seconds, "repeats": frames, "rate": rate}
        row["ours"] = "viewer map panel"
        viewer.close()
        canvas.close()
        yield row


def count(device: torch.device, quick: bool) -> int:
    return 3
