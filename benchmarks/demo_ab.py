"""The demo's training loop with and without one probe kind, runs alternating.

Each run of ``probescope demo`` times its loop with probes against a baseline without them;
on a shared 2-core machine that ratio moves by tens of percent from run to run. To see what
one probe adds, this runs the demo with all its probes and with one kind left out, taking
turns, and prints each run's loop time and ratio. Run:
``python -m benchmarks.demo_ab --without checkpoint --runs 4``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import probescope.demo as demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", required=True, help="the probe kind to leave out (e.g. checkpoint)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each variant")
    parser.add_argument("--dataset", default="blobs7")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's)")
    args = parser.parse_args(argv)
    every = demo.demo_probes

    def without(data, resolution=192, model=None):
        return [p for p in every(data, resolution, model) if p.kind != args.without]

    loops: dict[str, list[float]] = {"with": [], "without": []}
    try:
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.runs):
                for label, probes in (("with", every), ("without", without)):
                    demo.demo_probes = probes
                    r = demo.run_demo(
                        args.dataset, f"{out}/{label}", epochs=args.epochs, progress=False, export=False
                    )
                    loops[label].append(r.seconds_with_probes)
                    print(
                        f"{label:>7} {args.without}: loop {r.seconds_with_probes:.3f} s, "
                        f"baseline {r.seconds_without_probes:.3f} s, "
                        f"{r.seconds_with_probes / r.seconds_without_probes:.2f}x",
                        flush=True,
                    )
    finally:
        demo.demo_probes = every
    for label, times in loops.items():
        print(f"median loop {label} {args.without}: {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
