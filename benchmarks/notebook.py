"""What the live view in a notebook costs a training loop, measured in a real Jupyter kernel.

``python -m benchmarks.notebook [--steps 20000] [--rounds 3] [--resolution 192] [--fps 2 4]
[--hidden 64] [--batch 64]``: a 2-64-64-7 MLP trains on blobs (batch 64, SGD, one torch
thread: thousands of steps a second, the loop that feels any cost most) in an ipykernel process,
under a Monitor with a GridProbe map every 20 steps, a PredictionProbe and a LossProbe every
100, without a view (``off``) and with ``viewer="notebook"`` at each ``fps``, interleaved
round by round so the machine's drift falls on all of them alike. The kernel's outputs are
read here as a frontend reads them (the browser's own cost is not part of it).

Prints, per mode, the median steps per second and the slowdown against ``off``; for the
views, pictures per second, the view thread's milliseconds per picture (texture upload, draw,
read-back, PNG, send) and the kilobytes per picture, and the seconds the view takes to make
its canvas and draw its first picture (compiling its shaders), which the Monitor waits for
before the first step, as it does for its other compiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETUP = """
import json, time, torch, torch.nn.functional as F, probescope as ps
from probescope.datasets import make_dataset
torch.set_num_threads(1)
data = make_dataset("blobs7", seed=0, n=4000)

def train(viewer, fps, steps, resolution, hidden, batch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 7))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    probes = [ps.GridProbe(data.x_train, data.y_train, resolution=resolution, schedule=ps.Schedule.every(20)),
              ps.PredictionProbe(data.x_valid, data.y_valid, schedule=ps.Schedule.every(100)),
              ps.LossProbe(schedule=ps.Schedule.every(100))]
    n = len(data.x_train) - batch
    with ps.Monitor(model, probes, optimizer=opt, viewer=viewer, viewer_fps=fps) as monitor:
        view = monitor.viewer
        t0 = time.perf_counter()
        for step in range(steps):
            i = (step * batch) % n
            loss = F.cross_entropy(model(data.x_train[i : i + batch]), data.y_train[i : i + batch])
            opt.zero_grad(); loss.backward(); opt.step()
            monitor.step(loss=loss)
        seconds = time.perf_counter() - t0
    if monitor.summary()["nonfinite"]:
        raise RuntimeError(f"training diverged: {monitor.summary()['nonfinite']}")
    out = {"steps_per_s": steps / seconds, "seconds": seconds}
    if view is not None:
        out.update(images=view.images, bytes=view.bytes_sent, view_seconds=view.seconds,
                   startup_seconds=view.startup_seconds, error=view.error)
    print("RESULT", json.dumps(out))
"""


class Kernel:
    """One ipykernel process of this interpreter; ``run(code)`` executes a cell and returns
    its iopub messages, as a frontend receives them. The kernel spec is written to a folder
    of its own, so that neither a kernel installed on the machine nor the lookup of the
    native one (which imports ipykernel into this process) is involved."""

    def __init__(self, cwd: str | Path, specs: str | Path):
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        folder = Path(specs) / "probescope-kernel"
        folder.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        spec = {"argv": argv, "display_name": "probescope", "language": "python"}
        (folder / "kernel.json").write_text(json.dumps(spec))
        self.manager = KernelManager(
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)], ensure_native_kernel=False),
            kernel_name="probescope-kernel",
        )
        self.manager.start_kernel(cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 600.0) -> list[dict]:
        msg_id = self.client.execute(code)
        messages = []
        while True:
            message = self.client.get_iopub_msg(timeout=timeout)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(message)
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return messages

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def printed(messages: list[dict]) -> str:
    """What the cell printed (its stream outputs); an error in the cell raises here."""
    for m in messages:
        if m["msg_type"] == "error":
            raise RuntimeError("the cell raised:\n" + "\n".join(m["content"]["traceback"]))
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def result(text: str) -> dict:
    """The JSON a cell printed after ``RESULT``."""
    line = next(line for line in text.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def measure(
    steps: int, rounds: int, resolution: int, fps: list[float], hidden: int = 64, batch: int = 64
) -> dict[str, list[dict]]:
    from tqdm import tqdm

    modes = [("off", False, None)] + [(f"notebook {f:g} fps", "notebook", f) for f in fps]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in modes}
    with tempfile.TemporaryDirectory() as specs:
        kernel = Kernel(Path.cwd(), specs)
        try:
            printed(kernel.run(SETUP))
            shape = f"{resolution}, {hidden}, {batch}"
            printed(kernel.run(f"train(False, None, {min(steps, 300)}, {shape})"))  # warm-up
            with tqdm(total=rounds * len(modes), desc="notebook view", unit="run") as bar:
                for _ in range(rounds):
                    for name, viewer, f in modes:
                        messages = kernel.run(f"train({viewer!r}, {f!r}, {steps}, {shape})")
                        out = result(printed(messages))
                        out["updates"] = sum(m["msg_type"] == "update_display_data" for m in messages)
                        runs[name].append(out)
                        bar.update()
        finally:
            kernel.close()
    return runs


def report(runs: dict[str, list[dict]]) -> list[str]:
    base = statistics.median(r["steps_per_s"] for r in runs["off"])
    lines = [
        f"{'mode':<18} {'steps/s':>8} {'slowdown':>9} {'pictures/s':>11} {'ms/picture':>11} "
        f"{'kB/picture':>11} {'first (s)':>10}"
    ]
    for name, rs in runs.items():
        rate = statistics.median(r["steps_per_s"] for r in rs)
        line = f"{name:<18} {rate:8.0f} {base / rate:8.3f}x"
        if "images" in rs[0]:
            images = sum(r["images"] for r in rs)
            if any(r["error"] for r in rs) or any(r["updates"] != r["images"] for r in rs):
                raise RuntimeError(f"{name}: the view failed or lost pictures: {rs}")
            later = images - len(rs)  # each run's first picture is drawn before training starts
            line += f" {later / sum(r['seconds'] for r in rs):11.2f}"
            line += f" {1e3 * sum(r['view_seconds'] for r in rs) / max(later, 1):11.1f}"
            line += f" {sum(r['bytes'] for r in rs) / max(images, 1) / 1e3:11.1f}"
            line += f" {statistics.median(r['startup_seconds'] for r in rs):10.2f}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.notebook", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--fps", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--hidden", type=int, default=64, help="width of the MLP's two hidden layers")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    runs = measure(args.steps, args.rounds, args.resolution, args.fps, args.hidden, args.batch)
    print(
        f"2-{args.hidden}-{args.hidden}-7 MLP, batch {args.batch}, {args.steps} steps per run, "
        f"{args.rounds} rounds, map {args.resolution}², {time.perf_counter() - t0:.0f} s"
    )
    print("\n".join(report(runs)))
    return runs


if __name__ == "__main__":
    main()
