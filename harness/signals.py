"""Signals during a run: SIGTERM/SIGHUP become ``SystemExit`` so the record is written, Ctrl-C is
held off while the record is written and the workers are closed, and closing never half-happens."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def stop_signals_exit():
    """While the block runs, SIGTERM and SIGHUP (``kill``, a closed terminal) raise
    ``SystemExit(128 + signal)`` instead of ending the process on the spot, so the run record is
    written (``interrupted``) and a local Ray is shut down. Signals whose handler is not the
    default one are left alone, as is everything outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                saved[sig] = signal.signal(sig, stop)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class HeldSigint:
    """The Ctrl-Cs :func:`sigint_deferred` held off, and the handler they were meant for."""

    def __init__(self):
        self.got, self.handler = 0, None

    def resend(self) -> None:
        """Deliver a held Ctrl-C to the handler it was meant for (Python's raises KeyboardInterrupt)."""
        if self.got and callable(self.handler):
            self.got = 0
            self.handler(signal.SIGINT, None)


@contextlib.contextmanager
def sigint_deferred(held: HeldSigint | None = None, give_in: int | None = None):
    """Hold SIGINT (Ctrl-C) off while the block runs; yields a :class:`HeldSigint` (``held``, or a
    new one) whose ``resend()`` delivers one that came meanwhile. With ``give_in``, that many
    Ctrl-Cs during the block raise KeyboardInterrupt at once. Outside the main thread (where no
    handler can be set) it holds nothing off."""
    held = held if held is not None else HeldSigint()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    start = held.got

    def hold(signum, frame):
        held.got += 1
        if give_in is not None and held.got - start >= give_in:
            held.got = 0
            raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError):
        yield held
        return
    if held.handler is None:
        held.handler = before
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, before)


def close_all(*parts) -> None:
    """Close the searcher and the evaluator. Each is closed even when closing the other fails or
    is interrupted; a failure is one warning line, a Ctrl-C is raised once both are done."""
    interrupted = False
    for part in parts:
        if part is None:
            continue
        try:
            part.close()
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:
            print(f"warning: closing the {type(part).__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
