"""Executors: where the work units of a sweep run — local worker processes, or a Ray cluster.

An executor is a context manager (entered before the sweep writes anything: connecting to Ray
can fail) that runs ``work(unit) -> record`` on every unit (a picklable dict) and reports each
outcome to its caller as it comes: ``finished(unit, record, None)``, or ``finished(unit, None,
error)`` when the unit could not even report (its process died: out of memory, a signal). The
work function records its own failures; the executor knows nothing about what a unit does.

- :class:`LocalExecutor`: ``jobs`` processes on this machine, each pinned to its own share of the
  cores (``os.sched_setaffinity``) with ``threads`` intra-op threads (``OMP_NUM_THREADS`` and
  friends set before the worker imports torch). Several PyTorch processes that each spin every
  core slow each other down by far more than the share they lose (5–20× for the same training
  runs, measured on 2 cores), so each job keeps to its cores. ``jobs=1`` runs in this process.
  A worker watches its parent and exits when the parent dies (a SIGKILLed sweep leaves no
  orphan writing into the sweep directory).
- :class:`RayExecutor`: one Ray task per unit, ``num_cpus=threads`` and one GPU when the device
  asks for CUDA (or is ``auto`` and the cluster has GPUs). Ray is an optional extra
  (``pip install 'genprobe[ray]'``); on a cluster of several machines, the sweep directory must
  be on storage that every node sees at the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from .errors import ConfigError, first_line, one_line

log = logging.getLogger(__name__)

Unit = dict[str, Any]
Record = dict[str, Any]
Work = Callable[[Unit], Record]
Started = Callable[[Unit], None]
Finished = Callable[[Unit, "Record | None", "str | None"], None]

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
"""Environment variables that cap the thread pools of the numerical libraries a worker loads."""
PARENT_POLL_S = 0.5
"""How often a worker checks that its parent still lives (seconds)."""
STOP_WAIT_S = 10.0
"""How long stopped workers get to leave their files consistent before they are killed (seconds)."""
RAY_CONNECT_TIMEOUT_S = 5.0
"""How long the TCP check of a Ray ``--address`` may take before it is called unreachable (seconds)."""
EXECUTORS = ("local", "ray")


def available_cores() -> list[int]:
    """The CPU cores this process may run on, ascending."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads(jobs: int) -> int:
    """Threads per job when not given: an equal share of the available cores, at least 1."""
    return max(1, len(available_cores()) // max(1, jobs))


def core_sets(jobs: int, threads: int) -> list[list[int]]:
    """The cores of each of `jobs` workers: consecutive blocks of `threads` cores (wrapping
    around when jobs × threads exceeds the cores, which then share)."""
    cores = available_cores()
    return [sorted({cores[(j * threads + k) % len(cores)] for k in range(threads)})
            for j in range(jobs)]


def check_jobs(jobs, threads) -> tuple[int, int]:
    """(jobs, threads) as positive ints (threads None: :func:`default_threads`); ConfigError."""
    from .options import check_int

    for name, value in (("jobs", jobs), ("threads", threads)):
        check_int(name, value, 1, optional=True)
    jobs = 1 if jobs is None else jobs
    return jobs, default_threads(jobs) if threads is None else threads


def make_executor(kind: str, *, jobs: int, threads: int, address: str | None = None,
                  device: str = "auto"):
    """The executor `kind` (``local`` or ``ray``); checks what it needs (Ray installed, the
    address reachable) before any work, with one-line errors."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor={kind!r}; choose one of 'local', 'ray'")
    if kind == "local":
        if address is not None:
            raise ConfigError("--address names a Ray cluster; add --executor ray (or drop --address)")
        return LocalExecutor(jobs=jobs, threads=threads)
    return RayExecutor(jobs=jobs, threads=threads, address=address, device=device)


# ----------------------------------------------------------------------------- local


@contextlib.contextmanager
def _affinity(cores: list[int]) -> Iterator[None]:
    """This thread runs on `cores` inside the block: a process started here inherits them, and
    so does every thread it starts (torch's pools included)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:  # the sweep died (SIGKILL): stop writing into its directory
            os._exit(1)


def _worker_main() -> None:
    """A worker process (``python -c``; argv: socket fd, parent pid, ``module:function``): run
    the units its parent sends until it sends None or goes away. SIGTERM is a Ctrl-C: the unit
    stops the way an interrupted run does (resumable)."""
    import importlib

    fd, parent, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    module, _, name = target.partition(":")
    work = getattr(importlib.import_module(module), name)
    conn = Connection(fd)
    try:
        while True:
            try:
                unit = conn.recv()
            except EOFError:
                return
            if unit is None:  # done: nothing is left to write, so skip the slow interpreter exit
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            try:
                conn.send((work(unit), None))
            except Exception as exc:  # the work records its own failures; this is a last resort
                conn.send((None, f"{type(exc).__name__}: {one_line(exc)}"))
    except KeyboardInterrupt:
        return
    finally:  # leaving: a late SIGTERM or Ctrl-C just ends the process, quietly
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ignore_sigint() -> None:
    """In a worker process before it execs Python: ignore Ctrl-C. A terminal's Ctrl-C goes to the
    whole process group; the parent alone handles it and stops its workers (SIGTERM, which a
    worker turns into a resumable interruption). A worker that took it itself printed a
    KeyboardInterrupt traceback, mid-import when it came while the worker started. Python keeps
    an ignored SIGINT ignored at start-up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Worker:
    """A worker process on `cores`, started with `threads` threads for every numerical library,
    talking over a socket pair (a fresh interpreter: no fork of this process's state, and no
    re-run of the caller's main script as multiprocessing's spawn does)."""

    def __init__(self, work: Work, cores: list[int], threads: int) -> None:
        ours, theirs = socket.socketpair()
        env = os.environ | dict.fromkeys(THREAD_VARIABLES, str(threads))
        code = "from genprobe.executors import _worker_main; _worker_main()"
        argv = [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid()),
                f"{work.__module__}:{work.__qualname__}"]
        try:
            with _affinity(cores):
                self.process = subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(),),
                                                stdin=subprocess.DEVNULL, preexec_fn=_ignore_sigint)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.cores = cores
        self.unit: Unit | None = None

    def send(self, unit: Unit | None) -> None:
        self.unit = unit
        self.conn.send(unit)

    def receive(self) -> tuple[Record | None, str | None]:
        """The finished unit's (record, None), or (None, why) when the process died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:  # alive, but its end of the socket is gone
                self.process.kill()
                self.process.wait()
            return None, _death(self.process.returncode)

    def stop(self) -> None:
        """Ask it to end: None when idle, SIGTERM when busy (then :meth:`reap`)."""
        with contextlib.suppress(OSError, ValueError):
            if self.unit is None:
                self.conn.send(None)
            elif self.process.poll() is None:
                self.process.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for the process to end until `deadline` (time.monotonic), then kill it."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


def _death(code: int | None) -> str:
    """Why a worker process ended, from its return code (negative: the signal)."""
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += "; out of memory?"
    else:
        how = f"exit code {code}; its error is on stderr above"
    return f"its worker process died ({how})"


class LocalExecutor:
    """`jobs` worker processes on this machine, each on its own `threads` cores (module docs)."""

    def __init__(self, *, jobs: int = 1, threads: int = 1) -> None:
        self.jobs, self.threads = check_jobs(jobs, threads)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def describe(self) -> str:
        return f"local, {self.jobs} job(s) × {self.threads} thread(s)"

    def run(self, units: list[Unit], work: Work, *, started: Started, finished: Finished) -> None:
        if self.jobs == 1 or len(units) <= 1:
            for unit in units:  # one job: in this process (the work sets its own thread count)
                started(unit)
                finished(unit, work(unit), None)
            return
        pending = list(reversed(units))
        workers: list[_Worker] = []
        try:
            for cores in core_sets(min(self.jobs, len(units)), self.threads):
                workers.append(_Worker(work, cores, self.threads))
                self._next(workers[-1], pending, started)
            while any(w.unit is not None for w in workers):
                ready = wait([w.conn for w in workers if w.unit is not None])
                for i, worker in enumerate(workers):
                    if worker.unit is None or worker.conn not in ready:
                        continue
                    unit = worker.unit
                    record, error = worker.receive()
                    worker.unit = None
                    finished(unit, record, error)
                    if record is None and error is not None and worker.process.poll() is not None:
                        worker.conn.close()
                        if not pending:
                            continue
                        workers[i] = worker = _Worker(work, worker.cores, self.threads)
                    self._next(worker, pending, started)
        finally:  # all asked at once, then waited for: they end in parallel
            alive = [w for w in workers if w.process.poll() is None]
            for worker in alive:
                worker.stop()
            deadline = time.monotonic() + STOP_WAIT_S
            for worker in alive:
                worker.reap(deadline)

    @staticmethod
    def _next(worker: _Worker, pending: list[Unit], started: Started) -> None:
        if pending:
            unit = pending.pop()
            started(unit)
            worker.send(unit)


# ----------------------------------------------------------------------------- ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: "
                          "pip install 'genprobe[ray]'") from None
    return ray


def check_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """ConfigError (one line, within `timeout` seconds) unless a TCP connection to the Ray
    `address` (``host:port`` or ``ray://host:port``; ``auto`` and ``local`` are not checked) opens."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: write host:port or ray://host:port "
                          "(e.g. 10.0.0.5:6379), or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or first_line(exc))
        raise ConfigError(f"Ray cluster at {address} cannot be reached ({why} within {timeout:g} s); "
                          "start it with `ray start --head` or fix --address") from None


class _HeldStderr:
    """What was written to file descriptor 2 inside :func:`_held_stderr`; ``drop()`` discards it."""

    def __init__(self) -> None:
        self.keep = True

    def drop(self) -> None:
        self.keep = False


@contextlib.contextmanager
def _held_stderr() -> Iterator[_HeldStderr]:
    """Hold back what is written to file descriptor 2 inside the block (Ray's C++ core logs
    there directly, a line per retry while it tries an address); it is written out when the
    block ends, unless it was dropped."""
    import shutil
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    state = _HeldStderr()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield state
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if state.keep:
                held.seek(0)
                with open(2, "wb", closefd=False) as stderr:
                    shutil.copyfileobj(held, stderr)


class RayExecutor:
    """One Ray task per unit on a Ray cluster (``address``), or on a local Ray instance of
    jobs × threads CPUs (module docs)."""

    def __init__(self, *, jobs: int = 1, threads: int = 1, address: str | None = None,
                 device: str = "auto") -> None:
        self.jobs, self.threads = check_jobs(jobs, threads)
        self.address, self.device = address, device
        self.ours = False
        self.ray = _import_ray()
        if address is not None:
            check_address(address)

    def describe(self) -> str:
        where = f"cluster {self.address}" if self.address else "a local instance"
        return f"ray on {where}, {self.threads} thread(s) per task"

    def _gpus(self) -> int:
        if self.device == "cpu":
            return 0
        if self.device.startswith("cuda"):
            return 1
        return 1 if self.ray.cluster_resources().get("GPU", 0) > 0 else 0

    def __enter__(self) -> RayExecutor:
        """Connect to the cluster (or start a local instance) unless Ray is already initialized
        in this process; ConfigError (one line) when that fails."""
        ray = self.ray
        self.ours = not ray.is_initialized()
        if self.ours:
            with _held_stderr() as held:
                try:
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING, configure_logging=False,
                             num_cpus=None if self.address else self.jobs * self.threads,
                             # Ray runs workers at nice 15 by default; on the instance we start,
                             # at the priority the local executor's workers have (a cluster's
                             # own setting is its operator's)
                             _system_config=None if self.address else {"worker_niceness": 0})
                except Exception as exc:  # Ray raises many types (ConnectionError, RuntimeError, ...)
                    held.drop()  # its retry messages: the one line below says it all
                    where = f" at {self.address}" if self.address else ""
                    raise ConfigError(f"Ray could not start{where}: {first_line(exc)}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.ours:
            self.ray.shutdown()

    def run(self, units: list[Unit], work: Work, *, started: Started, finished: Finished) -> None:
        ray = self.ray
        cpus = int(ray.cluster_resources().get("CPU", self.jobs * self.threads))
        in_flight = max(self.jobs, cpus // self.threads, 1)
        task = ray.remote(num_cpus=self.threads, num_gpus=self._gpus(), max_retries=0)(work)
        pending = list(reversed(units))
        refs: dict[Any, Unit] = {}
        try:
            while pending or refs:
                while pending and len(refs) < in_flight:
                    unit = pending.pop()
                    refs[task.remote(unit)] = unit
                    started(unit)
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    unit = refs.pop(ref)
                    try:
                        record, error = ray.get(ref), None
                    except Exception as exc:  # the task's process died, or Ray lost it
                        record, error = None, f"ray: {type(exc).__name__}: {one_line(exc)}"
                    finished(unit, record, error)
        finally:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "available_cores", "check_address",
           "check_jobs", "core_sets", "default_threads", "make_executor"]
