"""Pre-emption signals: remember SIGTERM/SIGUSR1 and let the trainer stop at a step boundary."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

from medclust.errors import MedclustError

__all__ = ["PREEMPTION_SIGNALS", "SignalFlag", "TrainingInterrupted"]

log = logging.getLogger(__name__)

#: SLURM sends SIGTERM before killing a job (and SIGUSR1 with ``--signal=USR1@<seconds>``).
PREEMPTION_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(MedclustError):
    """Training stopped on a pre-emption signal after saving a checkpoint.

    The command line turns it into exit status ``128 + signal`` (143 for SIGTERM, 138 for
    SIGUSR1), the status a shell reports for a process killed by that signal, so schedulers
    see a pre-empted (not failed-on-input) job, and a rerun resumes from the checkpoint.

    Args:
        signum: the signal received.
        step: optimiser steps completed and saved.
        checkpoint: folder of the checkpoint written.
    """

    def __init__(self, signum: int, step: int, checkpoint: object) -> None:
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = str(checkpoint)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"received {name}: checkpoint saved at step {step} in {checkpoint}; rerun to resume")


class SignalFlag:
    """Context manager that records pre-emption signals instead of dying on them.

    The handler only sets a flag (nothing else is safe inside a signal handler); the training
    loop polls :attr:`received` at each step boundary. Previous handlers are restored on exit.
    Outside the main thread (where Python cannot install handlers) it records nothing.

    Args:
        signals: signal numbers to catch.
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        if self.received is None:
            self.received = signum

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: pre-emption signals are not caught")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
