"""Numba kernels: the CPU implementations of probescope.kernels' ops (imported on first use)."""

# Fast-math without the no-NaN/no-Inf assumptions: non-finite values must survive, so that a
# diverging model shows up as non-finite pixels instead of silently wrong colours.
FASTMATH = {"contract", "reassoc", "arcp", "afn", "nsz"}
