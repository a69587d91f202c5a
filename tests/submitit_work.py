"""The work of a sweep's unit for the submitit tests, importable by their jobs (tests/ on
PYTHONPATH): the real one, but one run stops in the middle, once, to be killed or preempted."""

import dataclasses
import functools
import os
import time
from pathlib import Path


def stall_in_selectivity(unit: dict) -> dict:
    """``run_unit(unit)``; but the run named by $STALL_RUN, the first time (until $STALL_MARKER
    exists), stops in its selectivity probe, after its training and robustness are saved: it
    writes its process id to $STALL_MARKER and sleeps until something ends it."""
    from genprobe.probes import registry
    from genprobe.sweep.work import run_unit

    marker = Path(os.environ["STALL_MARKER"])
    if unit["run"] == os.environ["STALL_RUN"] and not marker.exists():
        registry.list_probes()
        spec = registry._PROBES["selectivity"]

        @functools.wraps(spec.function)  # the same options
        def stalled(*args, **kwargs):
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(marker)
            time.sleep(600)
            return spec.function(*args, **kwargs)

        registry._PROBES["selectivity"] = dataclasses.replace(spec, function=stalled)
    return run_unit(unit)
