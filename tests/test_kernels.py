"""Reference kernels against independent computations (numpy, float64), at awkward shapes.

Tolerances: smoothing and interpolation are computed in float64, so 1e-12 relative; colour
channels are compared exactly where the float32 inputs make rounding unambiguous.
"""

import os

import numpy as np
import pytest
import torch

from probescope.kernels import (
    NONFINITE_RGBA,
    default_palette,
    grid_inputs,
    interpolate_frames,
    probs_to_rgba,
    smooth_1d,
)
from probescope.kernels.colormap import BOUNDARY_INK, DIVERGING_ANCHORS, MODES


@pytest.mark.parametrize(
    ("n", "width"), [(1, 1), (2, 1), (7, 3), (7, 7), (100, 9), (100, 51), (1001, 9), (1001, 51)]
)
def test_box_smoothing_matches_numpy_convolve_same(n, width):
    values = torch.from_numpy(np.random.default_rng(n * width).normal(size=n))
    expected = np.convolve(values.numpy(), np.ones(width) / width, mode="same")
    np.testing.assert_allclose(smooth_1d(values, width).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_gaussian_smoothing_matches_numpy_with_a_normalised_window():
    values = np.random.default_rng(1).normal(size=57)
    offsets = np.arange(11) - 5
    window = np.exp(-0.5 * (offsets / 2.0) ** 2)
    expected = np.convolve(values, window / window.sum(), mode="same")
    actual = smooth_1d(torch.from_numpy(values), 11, "gaussian", sigma=2.0).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


@pytest.mark.parametrize("width", [0, 2, 10, -3])
def test_smoothing_rejects_even_or_non_positive_widths(width):
    with pytest.raises(ValueError, match="odd"):
        smooth_1d(torch.zeros(20), width)


@pytest.mark.parametrize("method", ["linear", "smoothstep"])
@pytest.mark.parametrize("shape", [(1,), (5, 3), (7, 11, 2)])
def test_interpolated_frames_lie_between_the_two_frames(method, shape):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=shape), rng.normal(size=shape)
    k = 4
    frames = interpolate_frames(torch.from_numpy(a), torch.from_numpy(b), k, method).numpy()
    t = np.arange(1, k + 1) / (k + 1)
    if method == "smoothstep":
        t = t * t * (3 - 2 * t)
    for i in range(k):
        np.testing.assert_allclose(frames[i], a + (b - a) * t[i], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(1,), (5, 3), (7, 11, 2)])
def test_geometric_interpolation_is_evenly_spaced_in_log_space(shape):
    """train-viz's np.geomspace per element: a^(1-t) b^t; 0 in either frame stays 0, a
    negative value is NaN."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(1e-6, 1.0, size=shape), rng.uniform(1e-6, 1.0, size=shape)
    frames = interpolate_frames(torch.from_numpy(a), torch.from_numpy(b), 3, "geometric").numpy()
    for i, t in enumerate((0.25, 0.5, 0.75)):
        np.testing.assert_allclose(frames[i], a ** (1 - t) * b**t, rtol=1e-12)
    reference = np.geomspace(a, b, 5)[1:-1]  # numpy's own, endpoints dropped
    np.testing.assert_allclose(frames, reference, rtol=1e-12)
    edge = interpolate_frames(torch.tensor([0.0, 0.0, 0.4, -0.5]), torch.tensor([0.0, 0.6, 0.0, 0.5]), 2,
                              "geometric")  # fmt: skip
    assert torch.equal(edge[:, :3], torch.zeros(2, 3)) and torch.isnan(edge[:, 3]).all()


def test_interpolation_of_zero_frames_is_empty_and_shapes_must_match():
    assert interpolate_frames(torch.zeros(3), torch.ones(3), 0).shape == (0, 3)
    with pytest.raises(ValueError, match="shape"):
        interpolate_frames(torch.zeros(3), torch.ones(4), 2)


@pytest.mark.parametrize(("w", "h", "d"), [(1, 1, 2), (5, 3, 2), (4, 7, 6)])
def test_grid_inputs_are_row_major_points_on_the_plane(w, h, d):
    g = torch.Generator().manual_seed(w * h * d)
    origin, u, v = torch.randn(3, d, generator=g, dtype=torch.float64)
    us, vs = (
        torch.randn(w, generator=g, dtype=torch.float64),
        torch.randn(h, generator=g, dtype=torch.float64),
    )
    points = grid_inputs(origin, u, v, us, vs)
    for r in range(h):
        for c in range(w):
            np.testing.assert_allclose(
                points[r * w + c].numpy(), (origin + us[c] * u + vs[r] * v).numpy(), rtol=1e-12, atol=1e-12
            )


def test_region_mode_one_hot_is_the_palette_colour_and_uniform_is_white():
    palette = default_palette(5)
    one_hot = torch.eye(5)[None]  # (1, 5, 5)
    rgba = probs_to_rgba(one_hot, "region", palette)
    assert torch.equal(rgba[0, :, :3], palette)
    uniform = torch.full((2, 3, 5), 0.2)
    assert (probs_to_rgba(uniform, "region", palette)[..., :3] == 255).all()


def test_single_class_maps_colour_every_pixel_with_that_class():
    probs = torch.ones(3, 4, 1)
    palette = default_palette(1)
    for mode in ("region", "boundary"):
        rgba = probs_to_rgba(probs, mode, palette)
        assert (rgba[..., 3] == 255).all() and not (
            rgba == torch.tensor(NONFINITE_RGBA, dtype=torch.uint8)
        ).all(-1).any()
    assert torch.equal(probs_to_rgba(probs, "region", palette)[0, 0, :3], palette[0])


def test_boundary_mode_is_ink_where_the_top_two_classes_tie():
    probs = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    rgba = probs_to_rgba(probs, "boundary", default_palette(3))
    assert tuple(rgba[0, 0, :3].tolist()) == BOUNDARY_INK
    pale = np.floor(default_palette(3)[0].numpy() * 0.45 + 255 * 0.55 + 0.5)
    np.testing.assert_allclose(rgba[0, 1, :3].numpy(), pale, atol=1)


def test_prob_mode_hits_the_diverging_anchors():
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    probs = torch.stack([1 - q, q], -1)[None]  # (1, 5, 2)
    rgba = probs_to_rgba(probs, "prob", default_palette(2), class_index=1)
    assert [tuple(c) for c in rgba[0, :, :3].tolist()] == list(DIVERGING_ANCHORS)


def test_value_mode_spans_the_ramp_over_its_range_and_clamps_outside():
    lo, hi = -3.0, 5.0
    v = torch.tensor([lo - 10, lo, -1.0, 1.0, 3.0, hi, hi + 0.5])[None, :, None]  # one output
    rgba = probs_to_rgba(v, "value", default_palette(1), value_range=(lo, hi))
    anchors = list(DIVERGING_ANCHORS)
    assert [tuple(c) for c in rgba[0, :, :3].tolist()] == [anchors[0], *anchors, anchors[-1]]
    # The second of two outputs, and the range's middle is white whatever the first says.
    two = torch.stack([torch.randn(1, 3), torch.tensor([[1.0, 9.0, -7.0]])], -1)
    middle = probs_to_rgba(two, "value", default_palette(2), 1, value_range=(-7, 9))[0, 0, :3]
    assert tuple(middle.tolist()) == DIVERGING_ANCHORS[2]


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_pixels_get_the_distinct_colour(mode):
    probs = torch.softmax(torch.randn(4, 5, 3), -1)
    probs[1, 2, 0] = float("nan")
    probs[3, 4, 2] = float("inf")
    value_range = (-1.0, 2.0) if mode == "value" else None
    rgba = probs_to_rgba(probs, mode, default_palette(3), class_index=1, value_range=value_range)
    bad = torch.zeros(4, 5, dtype=torch.bool)
    bad[1, 2] = bad[3, 4] = True
    magenta = (rgba == torch.tensor(NONFINITE_RGBA, dtype=torch.uint8)).all(-1)
    assert torch.equal(magenta, bad)


def test_palette_colours_are_distinct_for_many_classes():
    palette = default_palette(40)
    assert len({tuple(c) for c in palette.tolist()}) == 40


@pytest.mark.parametrize("op", ["grid_mlp", "tensor_stats", "spectral_norm"])
def test_numba_kernels_release_the_gil_so_training_threads_keep_running(op):
    """A probe's CPU kernel on the worker thread must not stall the training thread's Python.
    (Numba's parallel kernels release the GIL by themselves; serial ones, like the power
    iteration, only with nogil=True.)"""
    pytest.importorskip("numba")
    import threading
    import time

    from torch import nn

    from probescope.kernels import GridSpec, grid_mlp, spectral_norm, tensor_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 7))
    big = torch.randn(1 << 24)
    matrix = torch.randn(1024, 1024)
    grid = GridSpec.rectangle((-1.0, 1.0, -1.0, 1.0), 512, 512)
    run = {
        "grid_mlp": lambda: grid_mlp(model, grid, impl="numba"),
        "tensor_stats": lambda: tensor_stats(big, impl="numba"),
        "spectral_norm": lambda: spectral_norm(matrix, 60, impl="numba"),
    }[op]
    run()  # compiled and warm
    t0 = time.perf_counter()
    run()
    alone = time.perf_counter() - t0
    worker = threading.Thread(target=run)
    ticks = 0
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0)  # pure Python: needs the GIL for every tick
    worker.join()
    # Holding the GIL, the kernel would leave this loop a tick or two; released, the loop
    # spins freely (tens of thousands of ticks a second) for the kernel's whole duration.
    assert ticks > 2000 * max(alone, 0.01), (ticks, alone)


def test_numba_kernels_leave_the_callers_torch_thread_count_alone():
    """Numba's OpenMP layer sets the calling thread's OpenMP thread count when it starts, and
    torch shares that setting: a probe compiling at attach in the training thread once turned
    the user's torch.set_num_threads(1) into 2, oversubscribing the cores the probe worker
    uses (a loop beside a GridProbe ran 3x slower). A fresh interpreter, so that Numba starts."""
    pytest.importorskip("numba")
    import subprocess
    import sys

    code = """
import torch
from torch import nn
torch.set_num_threads(1)
from probescope.kernels import GridSpec, grid_mlp, tensor_stats
model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
grid_mlp(model, GridSpec.rectangle((-1.0, 1.0, -1.0, 1.0), 33, 17), impl="numba")
tensor_stats(torch.randn(1000), impl="numba")
print(torch.get_num_threads())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


def test_a_numba_kernel_uses_the_threads_torch_allows_its_calling_thread():
    """The probe worker sets torch's thread count for itself (``probe_threads``); a Numba
    kernel called there follows it: one thread runs the serial twin (no OpenMP team to spin
    on training's cores), more run the parallel kernel on that many."""
    pytest.importorskip("numba")
    import threading

    import numba

    from probescope.kernels import smooth_1d
    from probescope.kernels._numba.smooth import smooth_1d_kernel

    ran = []
    serial, parallel = smooth_1d_kernel.serial, smooth_1d_kernel.parallel

    def spy(name, kernel):
        def run(*args):
            ran.append((name, numba.get_num_threads()))
            return kernel(*args)

        return run

    values = torch.randn(1000, dtype=torch.float64)
    expected = torch.from_numpy(np.convolve(values.numpy(), np.ones(5) / 5, mode="same"))

    def in_thread(torch_threads):
        def body():
            torch.set_num_threads(torch_threads)
            out = smooth_1d(values, 5, impl="numba")
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

        t = threading.Thread(target=body)
        t.start()
        t.join()

    smooth_1d_kernel.serial, smooth_1d_kernel.parallel = spy("serial", serial), spy("parallel", parallel)
    try:
        in_thread(1)
        if numba.config.NUMBA_NUM_THREADS >= 2:
            in_thread(2)
    finally:
        smooth_1d_kernel.serial, smooth_1d_kernel.parallel = serial, parallel
    assert ran[0][0] == "serial"
    if numba.config.NUMBA_NUM_THREADS >= 2:
        assert ran[1] == ("parallel", 2)


@pytest.mark.parametrize("first", ["parallel", "serial"])
def test_a_numba_kernels_serial_twin_and_parallel_kernel_each_load_their_own_cached_code(tmp_path, first):
    """Numba caches a function's compiled code on disk under its qualified name, keyed by
    signature but not by options: a serial twin of the same name loaded the parallel kernel's
    code (and started Numba's thread pool in the probe worker), or the other way round,
    whichever was compiled first. Each variant is compiled in one process, then the other is
    run alone from the same cache in a fresh one; the serial code never starts the pool, the
    parallel code always does."""
    pytest.importorskip("numba")
    import subprocess
    import sys

    (tmp_path / "twins.py").write_text(
        "import numba\n"
        "from probescope.kernels._numba import threads_aware\n\n\n"
        "@numba.njit(parallel=True, cache=True, nogil=True)\n"
        "def double(x, out):\n"
        "    for i in numba.prange(x.shape[0]):\n"
        "        out[i] = 2 * x[i]\n\n\n"
        "double = threads_aware(double)\n"
    )
    code = """
import sys
import numpy as np
from numba.np.ufunc import parallel as pool
import twins
from probescope.kernels._numba.histogram import histogram_kernel
variant = sys.argv[1]
x = np.arange(100, dtype=np.float32)
out = np.empty(100, np.float32)
getattr(twins.double, variant)(x, out)
assert (out == 2 * x).all()
counts = np.empty(13)
getattr(histogram_kernel, variant)(x, counts)
assert counts[3:].sum() == 100 and counts[0] == 0 and counts[1] == 99
hits = sum(getattr(k, variant).stats.cache_hits.total() for k in (twins.double, histogram_kernel))
print(variant, pool._is_initialized, hits)
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    second = "serial" if first == "parallel" else "parallel"
    lines = []
    for variant in (first, second):
        done = subprocess.run(
            [sys.executable, "-c", code, variant], capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        lines.append(done.stdout.split())
    started = {"parallel": "True", "serial": "False"}
    assert lines[0] == [first, started[first], "0"]  # compiled here, into an empty cache
    assert lines[1][:2] == [second, started[second]]  # its own code, not the other's from the cache


def test_a_numba_kernels_first_call_compiles_both_variants_for_its_signature():
    """A probe compiles its kernel at attach, in the training thread (the parallel variant);
    the probe worker, on one thread, runs the serial one: compiling it at the first frame
    would make that frame seconds long and skip the frames due meanwhile."""
    pytest.importorskip("numba")
    from probescope.kernels._numba.smooth import smooth_1d_kernel

    values = np.random.default_rng(0).standard_normal(37).astype(np.float32)[::-1]  # a new signature
    out = np.empty_like(values)
    assert len(smooth_1d_kernel.serial.signatures) == len(smooth_1d_kernel.parallel.signatures)
    before = set(smooth_1d_kernel.parallel.signatures)
    smooth_1d_kernel(values, np.ones(3, np.float32) / 3, out)
    added = set(smooth_1d_kernel.parallel.signatures) - before
    assert len(added) == 1 and added <= set(smooth_1d_kernel.serial.signatures)


def test_the_probe_worker_does_not_import_numba_for_probes_that_do_not_use_it():
    """Importing Numba takes the GIL for about 0.15 s: a worker that imported it at start
    delayed the first frame and stalled the training thread, for probes that may never call
    a Numba kernel (a CUDA model's). A fresh interpreter, so that nothing imported it yet."""
    import subprocess
    import sys

    code = """
import sys
from probescope.worker import ProbeWorker
worker = ProbeWorker()
ran = []
worker.submit(lambda: ran.append(1))
assert worker.wait_idle(30) and ran == [1]
worker.close()
print("numba" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False"


def test_colour_tables_are_copied_to_a_device_once_and_again_when_changed():
    from probescope.kernels.backend import device_copy

    palette = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    meta = torch.device("meta")  # another device than the table's, without a GPU
    first = device_copy(palette, meta)
    assert first.device == meta and device_copy(palette, meta) is first
    palette[0, 0] = 9  # an in-place change bumps the version: a fresh copy
    assert device_copy(palette, meta) is not first
    assert device_copy(palette, torch.device("cpu")).data_ptr() == palette.data_ptr()


def test_device_copies_live_as_long_as_their_source_and_no_longer():
    # A captured frame's CUDA graph reads the copy at every replay: it may not be evicted for
    # room while the source lives (the cache once cleared itself at 256 tables).
    import gc

    from probescope.kernels import backend

    meta = torch.device("meta")
    before = len(backend._DEVICE_COPIES)
    kept = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    first = backend.device_copy(kept, meta)
    for i in range(300):  # many other tables come and go
        backend.device_copy(torch.full((2, 3), i % 256, dtype=torch.uint8), meta)
    gc.collect()
    assert backend.device_copy(kept, meta) is first
    assert len(backend._DEVICE_COPIES) == before + 1
    del kept
    gc.collect()
    assert len(backend._DEVICE_COPIES) == before


def test_a_smoothing_window_is_built_once_so_the_gpu_copies_it_once():
    from probescope.kernels.smooth import smoothing_window

    assert smoothing_window(31, "gaussian") is smoothing_window(31, "gaussian", 31 / 4.0)
    assert smoothing_window(31, "gaussian", 3.0) is not smoothing_window(31, "gaussian")
    assert smoothing_window(5) is smoothing_window(5, "box", sigma=2.0)  # sigma means nothing here
    assert float(smoothing_window(31, "gaussian", 3.0).sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive sigma"):
        smoothing_window(5, "gaussian", -1.0)


def test_interpolation_weights_are_built_once_so_the_gpu_copies_them_once():
    from probescope.kernels.interpolate import interpolation_weights

    assert interpolation_weights(4, "smoothstep") is interpolation_weights(4, "smoothstep")
    assert interpolation_weights(4, "linear") is not interpolation_weights(4, "smoothstep")
    expected = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    assert torch.allclose(interpolation_weights(3, "linear"), expected)


def test_a_palette_is_taken_as_colours_or_from_a_colormap():
    import matplotlib

    from probescope.kernels.colormap import check_palette, resolve_palette

    given = check_palette(["#ff0000", (0, 128, 255), (0.0, 0.5, 1.0), "black"])
    assert resolve_palette(given, 4).tolist() == [[255, 0, 0], [0, 128, 255], [0, 128, 255], [0, 0, 0]]
    tab10 = resolve_palette(check_palette("tab10"), 3).numpy()
    expected = np.round(np.asarray(matplotlib.colormaps["tab10"].colors[:3]) * 255)
    np.testing.assert_array_equal(tab10, expected)  # a qualitative map's own first colours
    viridis = resolve_palette("viridis", 5).numpy()
    ends = np.asarray([matplotlib.colormaps["viridis"](t)[:3] for t in (0.0, 1.0)])
    np.testing.assert_array_equal(viridis[[0, -1]], np.round(ends * 255))  # spread over a continuous one
    assert len({tuple(c) for c in resolve_palette("tab10", 12).tolist()}) >= 10  # spread past its ten
    assert torch.equal(resolve_palette(None, 4), default_palette(4))
    for rows in (
        default_palette(3),
        default_palette(3).numpy(),
        default_palette(3).numpy().astype(np.float32) / 255,
    ):
        assert torch.equal(resolve_palette(check_palette(rows), 3), default_palette(3))  # arrays and tensors
    for bad, message in [("nope", "no matplotlib colormap"), (["#12"], "no colour matplotlib knows"),
                         ([(1, 2)], "must be \\(r, g, b\\)"), ([(0, 0, 300)], "ints are 0-255"),
                         ([(0.0, 0.5, 1.5)], "floats are 0-1"), ([], "at least one colour"),
                         (7, "a colormap's name or a sequence")]:  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=message):
            check_palette(bad)
    with pytest.raises(ValueError, match="palette has 2 colours for 3 classes"):
        resolve_palette(check_palette(["red", "blue"]), 3)


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_blend_mode_mixes_the_class_colours_by_probability(impl):
    palette = torch.tensor([[255, 0, 0], [0, 0, 255], [0, 200, 0]], dtype=torch.uint8)
    probs = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]]]
    )
    rgba = probs_to_rgba(probs, "blend", palette, impl=impl)
    assert rgba[0, :, :3].tolist() == [
        [255, 0, 0],  # sure: its class's colour
        [128, 0, 128],  # torn between two: their mixture (127.5 rounds half up)
        [64, 100, 64],
        [255, 255, 255],  # no weight anywhere: white
        [0, 0, 255],  # a negative value weighs nothing
    ]
