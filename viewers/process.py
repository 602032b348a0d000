"""A canvas in a process of its own, fed the newest frames through a pipe.

Drawing a vispy canvas is hundreds of GL calls through Python a picture; on a thread of the
training process it holds the GIL for all of them and hands it back and forth at each call,
which slows a training loop several times over (a window drawn by the loop cut a 3600 steps/s
loop to 1060: ``python -m benchmarks.window``). The notebook view and the window therefore draw
in a process of their own at lower CPU priority; a thread of the training process sends each probe's newest
frame when it changed, and nothing else of the training process waits for the drawing.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("probescope")

RENDER_NICENESS = 10  # the render process's, added to this one's (POSIX)
RENDER_TIMEOUT = 120.0  # seconds to wait for the render process (its start: imports, shaders)


class RenderError(RuntimeError):
    """What the render process reported (the error's type and message there)."""


class SentFrames:
    """The render process's viewer source: the newest frames sent to it."""

    def __init__(self, specs, out_dir: str | Path | None = None):
        self.specs = specs
        self.frames: dict = {}
        self.out_dir = Path(out_dir) if out_dir is not None else Path.cwd()

    def latest(self, name: str):
        return self.frames.get(name)

    def upload_path(self) -> str:
        return "host (frames sent to the render process)"


def lower_priority() -> None:
    """In the render process: leave the cores to training and the probes where they compete."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(RENDER_NICENESS)


class RenderProcess:
    """``target(conn, *args)`` in a new Python process, with one end of a pipe; the other end
    here. On POSIX the process is ``python -m probescope.viewers.process FD`` with the pipe's
    socket passed down: unlike multiprocessing's spawn, it never imports the program's main
    module again (a training script without an ``if __name__ == "__main__":`` guard would run
    again in it), and it is a fresh interpreter (exec'd at once), not a forked copy of a
    process with threads or a CUDA context. Elsewhere, multiprocessing's spawn."""

    def __init__(self, target, *args, name: str):
        ours, theirs = multiprocessing.Pipe()
        self.conn = ours
        where = f"{target.__module__}:{target.__qualname__}"
        if os.name == "posix":
            fd = theirs.fileno()
            self.process = _Popen(
                [sys.executable, "-m", "probescope.viewers.process", str(fd)], pass_fds=(fd,), name=name
            )
            theirs.close()
            ours.send((where, args))
        else:
            context = multiprocessing.get_context("spawn")
            self.process = context.Process(target=target, args=(theirs, *args), name=name, daemon=True)
            self.process.start()
            theirs.close()

    def receive(self, timeout: float = RENDER_TIMEOUT) -> tuple:
        """The process's next message; an error it reports is raised here, as is its end."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if not self.alive():
                raise RenderError(f"the render process ended (exit code {self.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the render process did not answer in {timeout:g} s")
        kind, *rest = self.conn.recv()
        if kind == "error":
            raise RenderError(rest[0])
        return (kind, *rest)

    def send(self, message) -> None:
        send_out_of_band(self.conn, message)

    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to finish (None), then end it if it has not."""
        with contextlib.suppress(Exception):
            self.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        with contextlib.suppress(Exception):
            self.conn.close()


class _Popen:
    """A subprocess with multiprocessing.Process's few methods used here."""

    def __init__(self, argv: list[str], pass_fds, name: str):
        self.name = name
        self._popen = subprocess.Popen(argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL)

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()


def _main(fd: int) -> None:
    """The render process's entry on POSIX: the pipe's end from ``fd``, then the target and
    its arguments from the pipe."""
    conn = multiprocessing.connection.Connection(fd)
    where, args = conn.recv()
    module, qualname = where.split(":")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    target(conn, *args)


class FedView:
    """A view whose canvas lives in a render process, fed by a thread of this process.

    The thread opens it (``_open``), then calls ``_tick(last)`` at most ``fps`` times a
    second until ``close()`` (``last`` is then True, for the final frames) or until ``_tick``
    returns False or ``_done()`` True, and stops the render process. A failure to open goes
    to ``_open_failed``, a later one to ``_failed``; either way training goes on. The interface
    the Monitor drives a viewer through (``pump``, ``refresh``, ``close``, ``closed``) is
    here; ``pump`` and ``refresh`` cost nothing, the thread does the work.
    """

    thread_name = "probescope-view"

    def __init__(self, source, fps: float, probes=None):
        if not fps > 0:
            raise ValueError(f"{type(self).__name__}: fps must be > 0, got {fps!r}")
        self.source, self.fps = source, float(fps)
        self._names = panel_names(source, probes)
        self.shown: dict[str, int] = {}  # probe -> seq of the newest frame given to the canvas
        self.error: str | None = None
        self.closed = False
        self._renderer: RenderProcess | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def pump(self) -> None:
        """Nothing to do: the view's thread works."""

    def refresh(self) -> bool:
        """Nothing to do: the view's thread works (``close`` shows the last frames)."""
        return False

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the view has opened (or failed to); True if that happened in time."""
        return self._ready.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Show the newest frames once more and stop the thread and the render process
        (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: still busy after %.0f s; leaving it", self.thread_name, timeout)
        self.closed = True

    def _specs(self) -> list:
        """The panels' specs, for the render process."""
        return [spec for spec in self.source.specs if spec.name in self._names]

    def _newest(self) -> dict:
        """Each shown probe's newest frame that the canvas has not been given."""
        return newest_frames(self.source, self._names, self.shown)

    def _open(self) -> None:
        raise NotImplementedError

    def _tick(self, last: bool) -> bool:
        raise NotImplementedError

    def _done(self) -> bool:
        return False

    def _open_failed(self, err: Exception) -> None:
        self.error = describe(err)

    def _failed(self, err: Exception) -> None:
        self.error = describe(err)

    def _run(self) -> None:
        try:
            self._open()
        except Exception as err:
            self._open_failed(err)
            self._end()
            return
        finally:
            self._ready.set()
        period = 1.0 / self.fps
        try:
            while True:
                t0 = time.perf_counter()
                last = self._stop.is_set() or self._done()
                if not self._tick(last) or last:
                    break
                self._stop.wait(max(0.0, period - (time.perf_counter() - t0)))
        except Exception as err:
            self._failed(err)
        finally:
            self._end()

    def _end(self) -> None:
        if self._renderer is not None:
            self._renderer.stop()
        self.closed = True


def describe(err: Exception) -> str:
    """An error in words: the render process's as it said it, others as ``Type: message``."""
    return str(err) if isinstance(err, RenderError) else f"{type(err).__name__}: {err}"


def send_out_of_band(conn, message) -> None:
    """``message`` pickled with its arrays' buffers sent as they are (pickle protocol 5): a
    frame's arrays (a 1024² map's probabilities and colours are 33 MB) are neither copied nor
    pickled under this process's GIL; the socket writes, which release it, send them."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send((header, len(buffers)))
    for buffer in buffers:
        conn.send_bytes(buffer.raw())


def receive_out_of_band(conn):
    """A message of :func:`send_out_of_band`."""
    header, count = conn.recv()
    return pickle.loads(header, buffers=[conn.recv_bytes() for _ in range(count)])


def newest_frames(source, names: list[str], shown: dict[str, int]) -> dict:
    """Each probe's newest frame in ``source`` that is not the one ``shown`` (name -> seq)."""
    frames = {}
    for name in names:
        frame = source.latest(name)
        if frame is not None and shown.get(name) != frame.seq:
            frames[name] = frame
    return frames


def panel_names(source, probes=None) -> list[str]:
    """The probes of ``source`` the viewer draws (of ``probes``, if given)."""
    wanted = {s.name for s in source.specs} if probes is None else set(probes)
    return [s.name for s in source.specs if s.name in wanted]


if __name__ == "__main__":
    _main(int(sys.argv[1]))
