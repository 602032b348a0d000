"""Numba kernels: the CPU implementations of probescope.kernels' ops (imported on first use)."""

# Fast-math without the no-NaN/no-Inf assumptions: non-finite values must survive, so that a
# diverging model shows up as non-finite pixels instead of silently wrong colours.
FASTMATH = {"contract", "reassoc", "arcp", "afn", "nsz"}


def threads() -> int:
    """The threads a Numba kernel may use in the calling thread: as many as torch allows it
    (the probe worker's ``probe_threads``, the training thread's ``torch.set_num_threads``),
    at most Numba's pool. Numba's own count is per thread and starts at the whole pool in
    every thread, so torch's is the one that says what the thread was given."""
    import numba
    import torch

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def threads_aware(kernel):
    """``kernel`` (a parallel Numba kernel) on ``threads()`` threads, or its serial twin when
    the calling thread has one (the probe worker's default).

    Under Numba's OpenMP threading layer a parallel region starts a team of every thread even
    when all but one are masked off, and the idle ones spin after it, on the cores training
    uses. The serial twin (the same code with ``prange`` as ``range``) starts no team.

    The twin is compiled from a copy of the function under a name of its own: Numba's on-disk
    cache names its entries by the function's qualified name and keys them by signature, not
    by options (numba/numba#6845), so a twin of the same name loads whichever of the two was
    compiled first, and the serial one ran the parallel code, or the parallel one the serial.
    """
    import types

    import numba
    import torch

    options = {k: v for k, v in kernel.targetoptions.items() if k in ("fastmath", "nogil", "boundscheck")}

    def call(*args):
        # Numba's OpenMP layer sets the calling thread's OpenMP thread count when it starts
        # and when it runs a parallel kernel, and torch shares that setting: a kernel run in
        # the training thread (a probe compiling at attach) would silently undo the user's
        # torch.set_num_threads. Put it back.
        before = torch.get_num_threads()
        n = threads()
        try:
            if n == 1:
                result = call.serial(*args)
            else:
                if numba.get_num_threads() != n:
                    numba.set_num_threads(n)
                result = call.parallel(*args)
            if len(call.serial.overloads) != len(call.parallel.overloads):
                compile_twins(call.serial, call.parallel)  # (loading a parallel one starts the layer)
            return result
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    func = kernel.py_func
    twin = types.FunctionType(
        func.__code__, func.__globals__, f"{func.__name__}_serial", func.__defaults__, func.__closure__
    )
    twin.__qualname__ = f"{func.__qualname__}_serial"  # its own cache entry
    call.parallel = kernel
    call.serial = numba.njit(parallel=False, cache=True, **options)(twin)
    call.__name__ = call.__qualname__ = kernel.__name__
    call.__doc__ = kernel.__doc__
    return call


def compile_twins(*variants) -> None:
    """Compile (or load from the cache) each variant for every signature another has: a
    probe compiles its kernel at attach, in the training thread, which runs the parallel
    variant, and the probe worker's first frame must not compile the serial one."""
    signatures = {sig for v in variants for sig in v.signatures}
    for variant in variants:
        for sig in signatures.difference(variant.signatures):
            variant.compile(sig)


def host_array(t, dtype):
    """A CPU tensor as a NumPy array of ``dtype``: a view when it already is one.

    The Numba paths build their small inputs in NumPy rather than with torch ops: a torch op
    releases the GIL and takes it back, and each such round trip in the probe worker lets a
    Python-bound training loop (a Keras step) lose the GIL to it."""
    import numpy as np
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        t = t.float()
    return np.asarray(t.numpy(), dtype=dtype)
