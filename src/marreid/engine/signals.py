"""A graceful stop on SIGINT / SIGTERM: the trainer finishes its step, checkpoints and returns.

Schedulers send SIGTERM before they preempt a job, and Ctrl-C sends SIGINT; a
run that dies on either loses everything since its last checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignals:
    """While installed, the first stop signal sets ``trainer.stop_requested``; a second one
    raises KeyboardInterrupt at once (for a user who will not wait for the step).

    ``install`` does nothing outside the main thread, where Python cannot handle signals,
    and leaves an ignored signal ignored (a shell starts background jobs with SIGINT
    ignored). ``received`` is the first signal's number, or None.
    """

    def __init__(self, trainer: Any, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.trainer = trainer
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        # Only flags here: printing from a handler can collide with the interrupted write.
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.trainer.stop_requested = True

    def install(self) -> StopOnSignals:
        """Put the handlers in place, remembering the previous ones."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopOnSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    return signal.Signals(signum).name


__all__ = ["StopOnSignals", "STOP_SIGNALS", "signal_name"]
