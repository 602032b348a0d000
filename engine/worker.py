"""The probe worker: one background thread that evaluates probe jobs in order."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("probescope")

_STOP = object()


class ProbeWorker:
    """Runs submitted jobs on a daemon thread, with gradients off; never raises into callers.

    ``threads`` caps the CPU threads of the worker's own torch operations (an OpenMP
    setting local to the worker thread) and of the Numba kernels it calls, which follow it,
    so probes leave the other cores to training.
    """

    def __init__(self, name: str = "probescope-worker", threads: int = 1):
        self._threads = threads
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

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
        torch.set_num_threads(self._threads)  # Numba kernels follow it (kernels._numba.threads)
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
