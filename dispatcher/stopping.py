"""How every long-running ``zkgate`` command stops: SIGINT or SIGTERM, cleanly.

docker, systemd and Kubernetes stop a process with SIGTERM; a person at a
terminal with Ctrl-C (SIGINT). Both must run the same clean stop: the main
task is cancelled, so every ``finally`` runs (the mirror closes its upstream
sessions, whose ephemerals the ensemble then deletes at once; the embedded
tree's store is closed), one line is logged and the command exits 0.

The first signal restores the default disposition of both signals before the
stop begins, so a second one ends the process at once, even while the clean
stop is blocked in a system call: killed by that signal, exit status 128+n.
As process 1 of a container (no init), where the kernel ignores a signal left
to its default, the second signal instead exits through :func:`os._exit` with
that same status.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

__all__ = ["STOP_SIGNALS", "run_until_stopped", "sole_cause"]

log = logging.getLogger("zkgate")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def sole_cause(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (trio's nurseries
    wrap a task's failure in one), so that a taken port reads as an OSError."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _only_interrupts(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_interrupts(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def run_until_stopped(main: Callable[[], Awaitable[object]], *, what: str) -> None:
    """``trio.run(main)`` until ``main`` returns or SIGINT or SIGTERM stops it.

    Returns normally after a stop by signal (having logged ``"<what> stopping"``
    with the signal's name in ``signal``). Anything else ``main`` raises is re-raised, taken
    out of single-exception groups (see :func:`sole_cause`).
    """
    originals = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        trio.run(_supervise, main, what)
    except BaseException as raised:
        if _only_interrupts(raised):
            # Ctrl-C before the signal receiver was in place (trio turns it into
            # KeyboardInterrupt at any checkpoint): nothing was serving yet.
            _log_stop(what, "SIGINT")
            return
        cause = sole_cause(raised)
        if cause is raised:
            raise
        raise cause from None
    finally:
        # The first signal set the defaults; an embedding caller gets its own back.
        for signum, original in originals.items():
            if original is not None:
                signal.signal(signum, original)


async def _supervise(main: Callable[[], Awaitable[object]], what: str) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            watch = functools.partial(_stop_on_signal, signals, nursery.cancel_scope, what)
            nursery.start_soon(watch)
            await main()
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope, what: str) -> None:
    async for signum in signals:
        for other in STOP_SIGNALS:
            signal.signal(other, _exit_at_once if os.getpid() == 1 else signal.SIG_DFL)
        _log_stop(what, signal.Signals(signum).name)
        scope.cancel()
        return


def _exit_at_once(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _log_stop(what: str, name: str) -> None:
    log.info(f"{what} stopping; a second signal ends it at once", extra={"signal": name})
