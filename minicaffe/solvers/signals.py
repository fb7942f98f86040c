"""Caffe's SignalHandler: SIGINT and SIGHUP ask the training loop to stop or to snapshot.

A handler only sets a flag; the solver asks once per iteration (``Solver.set_action_function``), so
a signal never interrupts an update or a snapshot half-way.
"""
import signal
import threading

from ..errors import SolverError

NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
SIGNAL_EFFECTS = (STOP, SNAPSHOT, NONE)


class SignalHandler:
    """SIGINT/SIGHUP only set flags; the solver asks ``check()`` once per iteration and acts on the
    configured effect (``stop``, ``snapshot`` or ``none``), as Caffe's SignalHandler/ActionCallback.

    Use as a context manager around training; the previous handlers come back on exit.
    """

    def __init__(self, sigint_effect=STOP, sighup_effect=SNAPSHOT):
        for name, value in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if value not in SIGNAL_EFFECTS:
                raise SolverError(f"invalid signal effect '{value}' for {name} (use stop, snapshot or none)")
        self.sigint_effect, self.sighup_effect = sigint_effect, sighup_effect
        self._got = {"INT": False, "HUP": False}
        self._old = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._got["INT"] = True
        elif hasattr(signal, "SIGHUP") and signum == signal.SIGHUP:
            self._got["HUP"] = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
            for s in sigs:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def check(self):
        """The requested action since the last call (SIGHUP first, as Caffe), then forget the signal."""
        if self._got["HUP"]:
            self._got["HUP"] = False
            return self.sighup_effect
        if self._got["INT"]:
            self._got["INT"] = False
            return self.sigint_effect
        return NONE

    __call__ = check
