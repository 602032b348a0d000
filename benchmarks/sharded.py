"""What probing a sharded model costs its training: an FSDP2 job (``fully_shard``) on
``--ranks`` processes, its steps timed with no Monitor; with a Monitor whose probes do not
read the model (a LossProbe: no gather); with a PredictionProbe every 10 steps, on a 5 %
budget (the probing rank announces each next step) and every step (at each of those steps
every rank gathers the whole model for the probing rank's unsharded copy, in buckets: one
collective each); every step gathered the naive way, a collective per parameter
(``DTensor.full_tensor()``, as torch.distributed.checkpoint's full state dict does); and with
``--frozen`` (all but the last layer frozen, as a fine-tune's body) also every step with
``snapshot_params="trainable"`` (the frozen weights gathered once). The variants take turns
round after round. The table gives the probing rank's median steps/s per variant, its ratio
to no Monitor, and the gathers' mean time in its training thread. Each rank trains on one
CPU thread over gloo (``--device cuda`` with NCCL, one GPU per rank, where the machine has
them). Run: ``python -m benchmarks.sharded [--ranks 2] [--hidden 512] [--rounds 3]
[--steps 60] [--frozen] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import probescope as ps
from benchmarks.timing import device_name
from probescope import gather

VARIANTS = ("off", "loss only", "every 10", "budget 5%", "every step", "every step, per parameter")
TRAINABLE = "every step, trainable"  # with --frozen: snapshot_params="trainable"


def variants(frozen: bool) -> tuple[str, ...]:
    return (*VARIANTS, TRAINABLE) if frozen else VARIANTS


BATCH = 256


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 7)
    )


def _probes(variant: str, held: torch.Tensor) -> list:
    if variant == "loss only":
        return [ps.LossProbe()]
    schedule = {"every 10": ps.Schedule.every(10), "budget 5%": ps.Schedule.budget(0.05)}.get(variant)
    labels = torch.zeros(len(held), dtype=torch.long)  # "per parameter": gathered the naive way
    return [ps.LossProbe(), ps.PredictionProbe(held, labels, schedule=schedule or ps.Schedule.every(1))]


def _fit(model, optimizer, x, y, steps: int, monitor) -> float:
    """Seconds for ``steps`` steps after a first untimed one (set-up, first gathers)."""
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            if x.is_cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        i = (step * BATCH) % (len(x) - BATCH)
        loss = nn.functional.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss=loss)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _one_by_one(sources, probe_rank):
    """No buckets: every sharded parameter gathered whole on every rank, one by one."""
    from torch.distributed.tensor import DTensor

    return [], [i for i, t in enumerate(sources) if isinstance(t, DTensor)]


def _rank(rank: int, world: int, store: str, out: str, args: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    cuda = args["device"] == "cuda"
    torch.set_num_threads(1)
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world
    )
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8192, 2, generator=g).to(device)
    y = (x[:, 0] > x[:, 1]).long()
    held = torch.randn(512, 2, generator=g)
    runs = variants(args.get("frozen", False))
    times: dict[str, list[float]] = {v: [] for v in runs}
    gathers: dict[str, list[float]] = {v: [] for v in runs}
    moved: dict[str, list[float]] = {v: [] for v in runs}  # elements a gather brought, mean
    bucketed = gather.plan_buckets
    try:
        for _ in range(args["rounds"]):
            for variant in runs:
                torch.manual_seed(0)
                model = mlp(args["hidden"]).to(device)
                if args.get("frozen"):  # a fine-tune's frozen body: only the last layer trains
                    model[:4].requires_grad_(False)
                for layer in (model[0], model[2], model[4]):
                    fully_shard(layer)
                fully_shard(model)
                optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
                gather.plan_buckets = _one_by_one if variant.endswith("per parameter") else bucketed
                if variant == "off":
                    times[variant].append(_fit(model, optimizer, x, y, args["steps"], None))
                    continue
                with ps.Monitor(
                    model,
                    _probes(variant, held),
                    optimizer=optimizer,
                    unsharded=lambda: mlp(args["hidden"]),
                    final_frame=False,
                    snapshot_params="trainable" if variant == TRAINABLE else None,
                ) as monitor:
                    times[variant].append(_fit(model, optimizer, x, y, args["steps"], monitor))
                    monitor.drain()
                done = monitor.summary().get("gathers", {})
                if monitor.probing and done.get("count"):
                    gathers[variant].append(done["seconds"] / done["count"])
                    moved[variant].append(monitor.snapshot_detail["gathered_elements"] / done["count"])
        result = {"times": times, "gathers": gathers, "elements": moved}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _ms(seconds: list[float]) -> str:
    return f"{1e3 * statistics.mean(seconds):.2f}" if seconds else "-"


def _count(elements: list[float]) -> str:
    return f"{statistics.mean(elements):,.0f}" if elements else "-"


def measure(ranks: int, hidden: int, rounds: int, steps: int, device: str, frozen: bool = False) -> dict:
    """Run the job on ``ranks`` processes: the probing rank's step times and gather times,
    per variant."""
    settings = {"hidden": hidden, "rounds": rounds, "steps": steps, "device": device, "frozen": frozen}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out")
        out.mkdir()
        try:
            mp.start_processes(
                _rank, args=(ranks, os.path.join(tmp, "store"), str(out), settings), nprocs=ranks
            )
        except mp.ProcessExitedException as err:
            # torch 2.13's gloo aborts a process at exit now and then ("terminate called without
            # an active exception"), after the ranks' final barrier: the results are whole then.
            if err.exit_code != -signal.SIGABRT or not all(
                (out / f"rank{r}.json").exists() for r in range(ranks)
            ):
                raise
            print(
                f"sharded: rank {err.error_index} aborted at exit, after its results (gloo)", file=sys.stderr
            )
        return json.loads((out / "rank0.json").read_text())


def usable(device: torch.device, ranks: int = 2) -> bool:
    """Whether ``device`` can hold the job: the CPU (gloo), or a GPU a rank (NCCL)."""
    return device.type == "cpu" or torch.cuda.device_count() >= ranks


def run(device: torch.device, quick: bool, peaks: dict):
    """The ``sharded`` suite of ``python -m benchmarks``: one row, the variants as providers,
    each a step's median time and the slowdown against no Monitor (on CUDA only where the
    machine has a GPU for each of two ranks)."""
    if not usable(device):
        print("sharded: two ranks need two GPUs (NCCL); skipped")
        return
    hidden, rounds, steps = (256, 2, 30) if quick else (512, 5, 100)
    probing = measure(2, hidden, rounds, steps, device.type)
    results = {}
    for variant, times in probing["times"].items():
        step_s = statistics.median(times) / steps
        gathers = probing["gathers"][variant]
        results[variant] = {
            "median_s": step_s,
            "repeats": rounds,
            "rate": f"{1 / step_s:.1f} steps/s" + (f", gather {_ms(gathers)} ms" if gathers else ""),
        }
    case = f"FSDP2 MLP 2-{hidden}-{hidden}-7, 2 ranks"
    yield {"op": "sharded", "case": case, "results": results, "ours": "off", "reference": "off"}


def count(device: torch.device, quick: bool) -> int:
    return 1 if usable(device) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--frozen", action="store_true", help="freeze all but the last layer, and add a trainable-only gather"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        parser.error(f"--device cuda needs a GPU per rank; this machine has {torch.cuda.device_count()}")
    probing = measure(args.ranks, args.hidden, args.rounds, args.steps, args.device, args.frozen)
    rates = {v: args.steps / statistics.median(t) for v, t in probing["times"].items()}
    gathers, elements = probing["gathers"], probing["elements"]
    params = sum(p.numel() for p in mlp(args.hidden).parameters())
    lines = [
        f"FSDP2 MLP 2-{args.hidden}-{args.hidden}-7 ({params:,} parameters) on {args.ranks} ranks, "
        f"batch {BATCH} a rank, {args.steps} steps x {args.rounds} rounds"
        + (", all but the last layer frozen" if args.frozen else ""),
        "",
        "| variant | steps/s (rank 0, median) | slowdown (off / variant) | a gather, rank 0 (mean ms) "
        "| elements a gather (mean) |",
        "|---|---|---|---|---|",
        *(
            f"| {v} | {r:.1f} | {rates['off'] / r:.3f} | {_ms(gathers[v])} | {_count(elements[v])} |"
            for v, r in rates.items()
        ),
    ]
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "command": "python -m benchmarks.sharded " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "rates": rates, **probing}
    (args.out / "sharded.json").write_text(json.dumps(result, indent=1))
    print(f"{meta['device']} · torch {meta['torch']} · {meta['date']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
