"""Ctrl-C, SIGTERM and SIGHUP during training: stop cleanly, lose nothing.

The first SIGINT, SIGTERM or SIGHUP (a closed terminal, a dropped ssh session) asks the loop to stop after the step
in progress; the loop then writes a checkpoint and exits with a message saying how to resume. A second SIGINT stops at once (KeyboardInterrupt):
the last checkpoint stays intact, since checkpoints are only ever replaced by a rename. Under torchrun, the
launcher forwards one signal to each worker and kills them after its --shutdown-timeout (30 s by default),
which a checkpoint write fits in.

A terminal's Ctrl-C reaches the whole process group: DataLoader worker processes too, which inherit the handler
when they fork. Only the process that entered StopRequests announces and acts; in a worker the signal is
ignored, so the worker goes on serving batches until the loop, stopping after its step, shuts it down. A
scheduler's SIGTERM reaches the group too (docker stop, systemd, Slurm): DataLoader workers ignore every stop
signal (pipeline_torch.worker_start), which torch's own SIGTERM handler in them would not.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

# SIGHUP: the terminal closed or the ssh session dropped; as final as SIGTERM, and as deserving of a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class StopRequests:
    """A context manager that catches the STOP_SIGNALS while it is entered; `signum` is the first one caught."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # print the notice (rank 0 only, under torchrun)
        self.signum: Optional[int] = None
        self._previous = {}
        self._owner_pid: Optional[int] = None  # the process that entered; forked children inherit the handler

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner_pid:  # a forked loader worker: its parent stops the run
            return
        if self.signum is None:
            self.signum = signum
            if self.announce:
                try:  # os.write: no locks, safe inside a signal handler
                    os.write(2, f"\nfastgan: {signal.Signals(signum).name} received: stopping after this step "
                                "and saving a checkpoint (Ctrl-C again to quit at once)\n".encode())
                except OSError:  # after SIGHUP the terminal may be gone: the checkpoint matters, not the notice
                    pass
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        # a SIGTERM after the first request changes nothing: the run is stopping already

    def __enter__(self) -> "StopRequests":
        self._owner_pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it alone
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
