"""The CUDA path: probe stream, event-ordered snapshots, device ring, no host syncs in training.

These need a GPU and are skipped without one (the CPU thread path has the same tests in
test_monitor.py).
"""

import copy
import logging
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from probescope import FrameRing, GridProbe, LossProbe, Monitor, PredictionProbe, Probe, Schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class SlowStepReader(Probe):
    """Reads every weight of its snapshot after keeping the probe stream busy for a while."""

    kind = "weights"

    def evaluate(self, model, context):
        torch.cuda._sleep(200_000)  # about 0.1 ms of GPU time before the read
        return {"values": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


class SetToStep(torch.optim.Optimizer):
    """An optimizer whose step sets every weight to its step number."""

    def __init__(self, params):
        super().__init__(params, {})
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(float(self.count))


def _big_model():
    return nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 8)).cuda()


@pytest.mark.parametrize(
    "hook", [False, True, "replaced"], ids=["wait-at-copy", "wait-at-optimizer-step", "replaced-optimizer"]
)
def test_every_cuda_frame_sees_the_weights_of_one_single_step(hook):
    model = _big_model()
    optimizer = SetToStep(model.parameters())
    probe = SlowStepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], optimizer=optimizer if hook else None, ring_capacity=512).start()
    if hook == "replaced":  # the loop steps another optimizer than the one the Monitor was given
        optimizer = SetToStep(model.parameters())
    for _ in range(300):
        if not hook:
            with torch.no_grad():  # the weights change outside any optimizer: wait at the copy
                for p in model.parameters():
                    p.fill_(float(optimizer.count + 1))
            optimizer.count += 1
        else:
            optimizer.step()
        monitor.step()
        time.sleep(0.001)  # a training step takes time; without it the loop outruns the probe
    monitor.close()
    frames = [f for f in monitor.ring(probe.name).read_since(-1) if f.step > 0]
    assert len(frames) >= 5
    for frame in frames:
        values = frame.data["values"]
        assert np.all(values == frame.step), f"frame at step {frame.step} mixes weights of several steps"


def _sync_warnings(run):
    """Run ``run`` with CUDA sync debugging on; (thread name, message) of every sync warning."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "called a synchronizing" in text:  # not the notice that the mode is a prototype
            with lock:
                seen.append((threading.current_thread().name, text))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original, warnings.showwarning = warnings.showwarning, show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = original
    return seen


def _train(monitor, model, optimizer, x, y, steps):
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss)


def test_monitored_training_never_synchronises_and_frames_cross_without_stream_syncs():
    model = _big_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 1024, device="cuda"), torch.randint(0, 8, (256,), device="cuda")
    probe = SlowStepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], optimizer=optimizer).start()
    monitor.drain(30)
    _train(monitor, model, optimizer, x, y, 3)  # warm-up: allocator, kernels
    monitor.drain(30)
    seen = _sync_warnings(lambda: (_train(monitor, model, optimizer, x, y, 50), monitor.drain(30)))
    monitor.close()
    assert seen == [], f"host synchronisations: {seen[:3]}"
    assert monitor.stats[probe.name].run >= 5 and monitor.stats[probe.name].failed == 0
    assert len(monitor.history.read()["batch_loss"].values) == 53


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_real_probes_never_make_the_training_thread_synchronise(graphs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(512, 2, device="cuda"), torch.randint(0, 3, (512,), device="cuda")
    probes = [
        GridProbe(x.cpu(), y.cpu(), resolution=128, schedule=Schedule.every(2)),
        PredictionProbe(x[:128], y[:128], schedule=Schedule.every(5)),
        LossProbe(schedule=Schedule.budget(0.05)),  # its step clock reads CUDA events
    ]
    monitor = Monitor(model, probes, optimizer=optimizer, cuda_graphs=graphs).start()
    _train(monitor, model, optimizer, x, y, 3)
    monitor.drain(60)
    seen = _sync_warnings(lambda: _train(monitor, model, optimizer, x, y, 40))
    monitor.close()
    training = [s for s in seen if s[0] == threading.main_thread().name]
    assert training == [], f"the training thread synchronised: {training[:3]}"
    for p in probes:
        assert monitor.stats[p.name].run >= 1 and monitor.stats[p.name].failed == 0, p.name
        assert p.graphs is None or p.graphs.active, p.graphs.reason


def test_device_ring_hands_out_the_newest_completed_frame_without_a_sync():
    model = _big_model()
    probe = SlowStepReader(schedule=Schedule.every(1))
    monitor = Monitor(model, [probe]).start()
    monitor.drain(30)
    frame = monitor.ring(probe.name).latest_device()
    host = monitor.latest(probe.name)
    assert frame is not None and frame.seq == host.seq and frame.tensors["values"].is_cuda
    np.testing.assert_array_equal(frame.tensors["values"].cpu().numpy(), host.data["values"])
    monitor.close()


def test_a_cuda_rings_memory_counts_its_device_slots_and_their_pinned_host_copies_once():
    ring = FrameRing("p", capacity=2)
    for step in range(3):
        ring.write({"v": torch.zeros(256, device="cuda"), "n": np.zeros(4)}, step, 0)
    torch.cuda.synchronize()
    assert ring.nbytes == {"host": 2 * (1024 + 32), "device": 2 * 1024}


def test_grid_frames_are_written_straight_into_the_device_ring():
    """On CUDA the kernels write into the ring's device slot (no device-to-device copy), the
    host copy goes to the slot's pinned buffers, and both hold the same frame."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 5)).cuda()
    probe = GridProbe(torch.randn(200, 2), resolution=(70, 33), schedule=Schedule.every(1))
    claimed = []
    monitor = Monitor(model, [probe])
    ring = monitor.ring("grid")
    real_claim = ring.claim

    def claim(key, shape, dtype, device):
        out = real_claim(key, shape, dtype, device)
        claimed.append((key, out.data_ptr(), ring._next_seq))
        return out

    ring.claim = claim
    monitor.start()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    for _ in range(5):
        loss = model(torch.randn(64, 2, device="cuda")).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss)
    monitor.drain(30)
    frame = ring.latest_device()
    host = monitor.latest("grid")
    assert frame is not None and frame.seq == host.seq
    slot = ring._slots[frame.seq % ring.capacity]
    mine = {key: ptr for key, ptr, seq in claimed if seq == frame.seq}
    assert mine == {key: slot.device[key].data_ptr() for key in ("probs", "rgba")}
    for key in ("probs", "rgba"):
        np.testing.assert_array_equal(frame.tensors[key].cpu().numpy(), host.data[key])
    monitor.close()


def test_high_priority_training_stream_trains_and_probes_still_run():
    model = _big_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1024, device="cuda"), torch.randint(0, 8, (64,), device="cuda")
    probe = SlowStepReader(schedule=Schedule.every(2))
    monitor = Monitor(model, [probe], optimizer=optimizer, high_priority_training=True).start()
    with monitor.training_stream():
        assert torch.cuda.current_stream() == monitor._streams.training
        _train(monitor, model, optimizer, x, y, 10)
    monitor.close()
    assert monitor.stats[probe.name].run >= 5 and monitor.stats[probe.name].failed == 0


class HostSyncing(nn.Module):
    """A forward with a host sync: it cannot be captured in a CUDA graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x) * (1.0 if float(x.sum()) > -1e9 else 0.0)


@pytest.mark.parametrize("capturable", [True, False])
def test_cuda_graph_replays_match_eager_forwards_or_fall_back(capturable):
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 3)) if capturable else HostSyncing()
    ).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(300, 2, device="cuda"), torch.randint(0, 3, (300,), device="cuda")
    probe = PredictionProbe(x[:100].cpu(), y[:100].cpu(), batch_size=64, schedule=Schedule.every(1))
    with Monitor(model, [probe], optimizer=optimizer, cuda_graphs=True) as monitor:
        _train(monitor, model, optimizer, x, y, 8)
    assert probe.graphs.active is capturable
    assert monitor.stats[probe.name].failed == 0
    torch.randn(4, device="cuda")  # a failed capture leaves the CUDA generator usable (no raise)
    reference = PredictionProbe(x[:100].cpu(), y[:100].cpu(), batch_size=64)
    reference.attach(model)
    eager = reference.evaluate(model, None)
    np.testing.assert_allclose(
        monitor.latest(probe.name).data["prob_true"], eager["prob_true"].numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("smoothing", [None, 0.5])
@pytest.mark.parametrize("mode", ["boundary", "blend", "value"])
def test_grid_probe_replays_one_graph_per_shadow_and_matches_eager_frames(smoothing, mode, caplog):
    from probescope.graphs import ForwardGraphs
    from probescope.probes.base import ProbeContext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).cuda()
    data, labels = torch.randn(64, 2), torch.randint(0, 3, (64,))
    options = dict(resolution=(37, 23), smoothing=smoothing, mode=mode)  # value: output 0 over (0, 2)
    graphed, eager = GridProbe(data, labels, **options), GridProbe(data, labels, **options)
    graphed.attach(model), eager.attach(model)
    graphed.graphs = ForwardGraphs("grid")
    shadows = [copy.deepcopy(model).eval() for _ in range(2)]  # the snapshot pool's two shadows
    for step in range(7):
        shadow = shadows[step % 2]
        with torch.no_grad():  # a snapshot copy: the shadow's weights change in place
            for p in shadow.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if step == 6:
                shadow[0].weight[0, 0] = float("nan")
        with caplog.at_level(logging.WARNING, logger="probescope"):
            got = {k: v.clone() for k, v in graphed.evaluate(shadow, ProbeContext(step, 0)).items()}
        want = eager.evaluate(shadow, ProbeContext(step, 0))
        torch.testing.assert_close(got["probs"], want["probs"], rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got["rgba"], want["rgba"], rtol=0, atol=0)
    # Per shadow: an eager frame, a capture and replay, then replays.
    assert graphed.graphs.active and graphed.graphs.replays == 5
    assert "nonfinite" in graphed._warned
    assert [r for r in caplog.records if "non-finite" in r.getMessage()]


def test_graphs_are_captured_before_the_first_step_and_ring_buffers_reused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(300, 2, device="cuda"), torch.randint(0, 3, (300,), device="cuda")
    probe = GridProbe(x.cpu(), y.cpu(), resolution=48, schedule=Schedule.every(1))
    monitor = Monitor(model, [probe], optimizer=optimizer, cuda_graphs=True, ring_capacity=4).start()
    monitor.drain()
    # Warm-up: per shadow an eager frame, then a capture and its replay; the step-0 frame replays.
    assert probe.graphs.replays == 3
    ring = monitor.ring(probe.name)

    def buffers():
        return [id(t) for slot in ring._slots for t in [*slot.device.values(), *slot.pinned.values()]]

    for _ in range(6):  # a frame at each step: one lap of the ring and more
        _train(monitor, model, optimizer, x, y, 1)
        monitor.drain()
    assert ring.written >= ring.capacity and all(slot.device and slot.pinned for slot in ring._slots)
    first_lap = buffers()
    _train(monitor, model, optimizer, x, y, 10)
    monitor.close()
    frames = monitor.stats[probe.name].run
    assert frames >= 8 and probe.graphs.replays == 2 + frames  # every frame in training: a replay
    assert buffers() == first_lap  # later laps write into the same device and pinned buffers


def test_a_cuda_loss_that_turns_nan_is_warned_about_at_close_without_a_sync(caplog):
    model = nn.Linear(2, 3).cuda()
    monitor = Monitor(model, [GridProbe(torch.randn(32, 2), resolution=8, schedule=Schedule.never())])
    monitor.start()
    losses = [torch.tensor(float("nan") if step >= 5 else 1.0 / step, device="cuda") for step in range(1, 9)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in losses:  # no probe reads the history while training runs
            monitor.step(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with caplog.at_level(logging.WARNING, logger="probescope"):
        monitor.close()
    warned = [r.getMessage() for r in caplog.records if "not a finite number" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Monitor: train_loss is nan at step 5,")
    assert monitor.summary()["nonfinite"] == {"train_loss": {"step": 5, "value": "nan"}}
