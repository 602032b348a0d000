"""How an open Monitor closes when the process ends without closing it.

A script that never calls ``close()`` (no ``with`` block) has its Monitors closed at exit;
SIGTERM and SIGHUP, which would end the process on the spot, raise ``Terminated`` in the main
thread instead, so the training loop unwinds and every open Monitor closes with its final
frames, weights and status. The Monitor registers itself in ``OPEN`` when it starts and takes
the signals (``take_ending_signals``) where the program has no handler of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from probescope.monitor import Monitor

log = logging.getLogger("probescope")

#: The Monitors started and not yet closed in this process (the Monitor adds and discards itself).
OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close every Monitor a script left open (no ``close()``, no ``with`` block) when the
    interpreter exits, so that its last frames, weights and status reach the run directory;
    an uncaught error that ended the script is the run's error."""
    error = getattr(sys, "last_value", None)
    for monitor in list(OPEN):
        if monitor._pid == os.getpid():  # not in a forked child
            if monitor._ended_by is None:
                log.warning("Monitor: closed at exit; call close() or use it as a context manager")
            monitor._close_timeout = min(monitor._close_timeout, 10.0)
            monitor.close(error)


#: The signals that end a process on the spot by default and that an open Monitor turns into
#: a clean close: SIGTERM (a scheduler's time limit, ``docker stop``, ``kill``) and SIGHUP
#: (the terminal of an ssh session closed under a run started without nohup or tmux).
ENDING_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(SystemExit):
    """Raised in the main thread when the process gets one of ``ENDING_SIGNALS`` while a
    Monitor with ``handle_sigterm`` is open: the training loop unwinds (``finally`` blocks
    run), every open Monitor closes with status ``interrupted`` (final frames, weights,
    summary), and the process exits with status 128 + the signal's number (143 for SIGTERM),
    as a process killed by it is reported."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"the process got {self.signal}"


def _on_sigterm(signum, frame) -> None:
    mine = [m for m in list(OPEN) if m._pid == os.getpid()]
    if not mine:  # a forked child (a data loader's worker), or every Monitor closed
        if signal.getsignal(signum) is _on_sigterm:  # as without us: the default, death
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return  # else a handler of the program's that calls ours too: its own decides
    for other in ENDING_SIGNALS:  # a second signal ends the process at once
        if signal.getsignal(other) is _on_sigterm:
            signal.signal(other, signal.SIG_DFL)
    error = Terminated(signum)
    log.warning(
        "Monitor: %s: closing the run (final frames, weights, status), then exiting with status "
        "%d; a second signal ends the process at once",
        error.signal,
        error.code,
    )
    for monitor in mine:
        monitor._ended_by = error  # closed by the with block, or at exit: either way, this
    raise error


def take_ending_signals() -> bool:
    """Install the handler for each of ``ENDING_SIGNALS`` the process has no handler for (the
    default), from the main thread, the only one that may; True if ours is in place for any."""
    if threading.current_thread() is not threading.main_thread():
        return False
    ours = False
    for signum in ENDING_SIGNALS:
        current = signal.getsignal(signum)
        if current == signal.SIG_DFL:  # not the program's own (or SIG_IGN, or one set outside Python)
            signal.signal(signum, _on_sigterm)
            current = _on_sigterm
        ours = ours or current is _on_sigterm
    return ours


def give_back_ending_signals() -> None:
    """Restore the default handling once no Monitor of this process is open."""
    if any(m._pid == os.getpid() for m in list(OPEN)):
        return
    if threading.current_thread() is not threading.main_thread():
        return  # left in place: with no Monitor open it does what the default does
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) is _on_sigterm:
            signal.signal(signum, signal.SIG_DFL)
