#!/usr/bin/env bash
# Runs on a lent GPU machine whose python3 already has torch, triton, numba and pytest:
# installs probescope without touching those, then runs the named steps, logs under $OUT.
#   bash benchmarks/on_device.sh [tests|tests-all|tests-par|tests-pixels] [tune|tune-target] [report] [kernels] [overhead] [frames] [fit] [budget-start] [budget-accounting] [stream-trace] [tune-colormap] ...
# (tune-target: the launch sweep of the MLPs behind the kernel targets only; report: what the
# grid kernel compiles to with this machine's Triton, and whether it still miscompiles chained
# row-major products: benchmarks/triton_report.py, benchmarks/triton_chained_dot.py)
# (tests-par: the whole suite but the pixels and kloop layouts' tests in 8 pytest-xdist workers,
# two CPU threads each; tests-pixels: those, in one process)
# STEP_TIMEOUT (seconds, default 900) bounds each step, so one slow step leaves time for the rest.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
# The machine reaches no package index: .whl carries the wheels it lacks (vispy, hmmlearn,
# plotly, imageio-ffmpeg, freetype-py, hsluv; lightning, pytorch-lightning, lightning-utilities
# and torchmetrics for the Lightning tests, keras, absl-py, namex, optree, h5py, ml-dtypes,
# rich, markdown-it-py, mdurl and pygments for the Keras tests; fastai, fastcore, fasttransform,
# fastdownload, plum-dispatch<2.10, beartype and fastprogress<1.1 (without
# fasthtml) for the fastai tests, torchvision being in the image: each skips without them;
# pip download --no-deps --python-version 3.12 --only-binary=:all:).
# The viewer suite needs vispy's wheels in .whl and the GL loaders in .gl (Debian packages
# libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2, fetched with apt-get download; see
# the device tool's README); the NVIDIA driver provides EGL itself.
if [ -d .gl ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  # vispy's text needs libfontconfig (its fonts are bundled); unpack a library only where
  # the machine lacks it, so nothing it has is replaced.
  for f in .gl/fc/*.deb; do
    lib=$(dpkg -c "$f" | grep -o 'lib[a-z0-9_-]*\.so\.[0-9]*' | head -1)
    if [ -z "$lib" ] || ! ldconfig -p | grep -q "$lib "; then dpkg -x "$f" /; fi
  done
  ldconfig
fi
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
for step in "$@"; do
  echo "=== $step $(date -Is)"
  T="timeout ${STEP_TIMEOUT:-900}"
  case $step in
    tests) $T python3 -m pytest -q -p no:cacheprovider -x --timeout 300 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    # The grid kernel's pixels- and kloop-layout tests (pixels: 39 passed on an H100, 2026-11-24) run
    # in a process of their own (tests-pixels), so an illegal address there (a sticky CUDA error)
    # cannot fail others.
    tests-par) OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 NUMBA_NUM_THREADS=2 $T python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 8 --timeout 300 -rfE --durations=15 -k "not (layouts and (pixels or kloop))" 2>&1 | tee "$OUT/pytest.log" | grep -v "PASSED\|SKIPPED" | tail -60 ;;
    tests-pixels) $T python3 -m pytest -v -p no:cacheprovider -p no:benchmark --timeout 300 -rfE -k "layouts and (pixels or kloop)" 2>&1 | tee "$OUT/pytest-pixels.log" | grep -v PASSED | tail -40 ;;
    tests-all) $T python3 -m pytest -q -p no:cacheprovider --timeout 300 2>&1 | tee "$OUT/pytest.log" | tail -60 ;;
    tune) $T python3 -m benchmarks.tune_grid_mlp --out "$OUT" 2>&1 | tee "$OUT/tune.log" ;;
    # one process an MLP: a configuration that faults the GPU cannot lose the other's sweep
    tune-target) for m in 2-256-256-256-7 2-64-64-3; do $T python3 -m benchmarks.tune_grid_mlp --mlp $m --out "$OUT/tune-$m" 2>&1 | tee "$OUT/tune-$m.log"; done ;;
    fit) for fw in keras fastai lightning; do
           $T python3 -m benchmarks.fit --framework $fw --out "$OUT/fit" 2>&1 | tee "$OUT/fit-$fw.log"
         done ;;
    budget-start) $T python3 -m benchmarks.budget_start --device cuda --resolution 1024 --steps 5000 --rounds 3 --out "$OUT/budget_start.json" 2>&1 | tee "$OUT/budget_start.log" ;;
    tune-colormap) $T python3 -m benchmarks.tune_colormap --out "$OUT/tune_colormap" 2>&1 | tee "$OUT/tune_colormap.log" ;;
    stream-trace) for r in 1024 512; do $T python3 -m benchmarks.stream_trace --device cuda --resolution $r --out "$OUT/stream_trace-$r" 2>&1 | tee "$OUT/stream_trace-$r.log"; done ;;
    budget-accounting) $T python3 -m benchmarks.budget_accounting --device cuda --resolution 1024 --rounds 2 --steps 3000 --budget 0.02 --out "$OUT/budget_accounting.json" 2>&1 | tee "$OUT/budget_accounting.log" ;;
    grid-frame) $T python3 -m benchmarks.grid_frame --device cuda --rounds 9 --out "$OUT/grid_frame.json" 2>&1 | tee "$OUT/grid_frame.log" ;;
    report) $T python3 -m benchmarks.triton_report 2>&1 | tee "$OUT/triton_report.log"
      $T python3 -m benchmarks.triton_chained_dot 2>&1 | tee "$OUT/triton_chained_dot.log" ;;
    *) $T python3 -m benchmarks "$step" --device cuda --out "$OUT/$step" 2>&1 | tee "$OUT/$step.log" | grep -v '%|' ;;
  esac
done
