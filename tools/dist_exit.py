"""Ending a torchrun worker without torch's gloo teardown crash.

A gloo process group runs its collectives on worker threads, and a finished collective is released by
the thread that ran it, which may still be doing so after the script has returned.  If that release
drops the last reference to a tensor that holds a Python object while the interpreter is finalizing
(its garbage collection, after the atexit handlers), the thread cannot take the GIL, is told to exit
mid-destructor, and the process aborts with "terminate called without an active exception": a run that
trained, printed and saved everything then exits with SIGABRT and torchrun reports it failed (seen here
in about 1 of 10 two-process FSDP2 runs, also after a final barrier and destroy_process_group()).
Workers therefore run the atexit handlers (logging, wandb and the like), flush Python's and C's
buffered output, and leave with ``os._exit``, skipping only the finalization that races."""
from __future__ import annotations

import atexit
import ctypes
import os
import sys


def is_distributed_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_process(code: int = 0) -> None:
    """The last call of a training script's ``__main__`` block.  A single process exits normally."""
    if not is_distributed_worker():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # output of C/C++ extensions still in libc's buffers
    except (OSError, AttributeError):
        pass
    os._exit(code)
