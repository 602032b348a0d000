"""The probe worker: one background thread that evaluates probe jobs in order."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("probescope")

_STOP = object()


def start_thread(target: Callable[[], None], name: str, threads: int) -> threading.Thread:
    """Start a daemon thread running ``target`` whose torch operations (and the Numba kernels,
    which follow torch, see ``kernels._numba.threads``) use ``threads`` CPU threads.

    torch keeps one process-wide thread count besides each thread's own: a thread takes the
    process-wide count as its own the first time it asks for it, and ``torch.set_num_threads``
    sets both. So the new thread fixes its own count first (a later change of the process-wide
    one cannot reach it), then sets it, and the caller puts the process-wide count back to its
    own: the caller, and threads started later (a training thread, a data loader's), keep the
    count they would have had without probescope.
    """
    default = torch.get_num_threads()  # fixes the caller's own count, if nothing did yet
    ready = threading.Event()

    def run() -> None:
        try:
            torch.get_num_threads()
            torch.set_num_threads(threads)
        finally:
            ready.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    torch.set_num_threads(default)
    return thread


class ProbeWorker:
    """Runs submitted jobs on a daemon thread, with gradients off; never raises into callers.

    ``threads`` caps the CPU threads of the worker's own torch operations (an OpenMP
    setting local to the worker thread) and of the Numba kernels it calls, which follow it,
    so probes leave the other cores to training.
    """

    def __init__(self, name: str = "probescope-worker", threads: int = 1):
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = start_thread(self._run, name, threads)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job; returns at once."""
        with self._idle:
            self._pending += 1
        self._queue.put(job)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued jobs and stop the thread; False if it did not stop in time."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                job()
            except Exception:  # a job handles its own errors; this is the last line of defence
                log.exception("probe worker: a job raised")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
