"""Work functions for the executor tests, importable by worker processes (tests/ on PYTHONPATH)."""

import os
import signal


def die_on_odd(unit: dict) -> dict:
    """Kill this worker process on odd units (as the kernel's OOM killer would); otherwise say
    where the unit ran: the process, its cores and its thread setting."""
    if unit["n"] % 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n": unit["n"], "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)),
            "omp": os.environ.get("OMP_NUM_THREADS")}


def interrupt_myself(unit: dict) -> dict:
    """Send this worker a Ctrl-C (SIGINT, as a terminal sends to the whole process group) and
    carry on: a worker leaves Ctrl-C to its parent."""
    os.kill(os.getpid(), signal.SIGINT)
    return {"n": unit["n"], "pid": os.getpid()}


def niceness(unit: dict) -> dict:
    """This worker's scheduling priority (its nice value)."""
    return {"n": unit["n"], "nice": os.nice(0)}
