"""SIGINT and SIGTERM recorded, not raised, so a run saves and stops between chunks.
:mod:`pureflax.rundir` exports :class:`StopFlag`."""

from __future__ import annotations

import signal


class StopFlag:
    """Records SIGINT/SIGTERM so the loop can save and stop between chunks (restores the old handlers).

    Args:
        signum: a signal that arrived before (a script records them from its first line, so a
            Ctrl-C during start-up is never raised inside an import or a callback).
    """

    def __init__(self, signum: int | None = None):
        self.signum: int | None = signum
        self._old = {}
        self._depth = 0  # entered this many times (a sweep's run folders share one flag): the outermost installs

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: no handlers, the run cannot be interrupted cleanly
                pass
        return self

    def _set(self, signum, frame):
        del frame
        self.signum = self.signum or signum  # the first one counts; Ctrl-C held down is one stop

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
