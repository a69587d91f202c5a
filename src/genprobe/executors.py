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
- :class:`RayExecutor`: a pool of Ray actors, each a worker process holding ``num_cpus=threads``
  and one GPU when the device asks for CUDA (or is ``auto`` and the cluster has GPUs), that
  imports the work function once and runs unit after unit, as the local executor's workers do
  (a Ray *task* per unit would do on CPUs too, but Ray gives a task that holds a GPU a fresh
  process each time: torch and genprobe imported again for every run). Ray is an optional extra
  (``pip install 'genprobe[ray]'``); on a cluster of several machines, the sweep directory must
  be on storage that every node sees at the same path.
- :class:`SubmititExecutor`: one SLURM job per unit through submitit, submitted as one job array
  (one ``sbatch``, see the class), with its partition, time limit, CPUs, GPUs and memory; its
  files (each job's pickled call, logs and result, and ``jobs.json``, the jobs submitted for each
  unit) go in ``OUT/submitit/``. It can submit and return (``wait=False``); a later invocation
  waits for the jobs still queued or running and submits again the units whose job ended
  without finishing them (killed, preempted and not requeued, out of memory). submitit is an
  optional extra (``pip install 'genprobe[submitit]'``).
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
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.connection import Connection, wait
from pathlib import Path
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
EXECUTORS = ("local", "ray", "submitit")


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


def make_executor(kind: str, *, jobs: int | None, threads: int | None, address: str | None = None,
                  device: str = "auto", out: str | Path | None = None,
                  slurm: Mapping[str, Any] | None = None, wait: bool = True, name: str = "genprobe",
                  run_seconds: float | None = None, check_time: bool = True):
    """The executor `kind` (``local``, ``ray`` or ``submitit``); checks what it needs (Ray or
    submitit installed, the address reachable, the SLURM options, the sweep directory `out` on
    shared storage, the time limit against `run_seconds`, the longest finished run) before any
    work, with one-line errors. ``slurm``: the options of :class:`SubmititExecutor`; ``wait``:
    False to submit and return (submitit only); ``check_time``: False when the caller checks the
    time limit itself (the sweep's plan, against its estimate)."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor={kind!r}; choose one of 'local', 'ray', 'submitit'")
    if address is not None and kind != "ray":
        raise ConfigError("--address names a Ray cluster; add --executor ray (or drop --address)")
    if kind != "submitit":
        if not wait:
            raise ConfigError("--no-wait submits SLURM jobs and returns; add --executor submitit "
                              "(local and Ray runs end with the command)")
        if slurm:
            flags = ", ".join(f"--slurm-{key}" for key in slurm)
            raise ConfigError(f"{flags} set(s) SLURM jobs; add --executor submitit (or drop it)")
    if kind == "local":
        return LocalExecutor(jobs=jobs, threads=threads)
    if kind == "ray":
        return RayExecutor(jobs=jobs, threads=threads, address=address, device=device)
    if out is None:
        raise ConfigError("the submitit executor needs the sweep directory (out=)")
    return SubmititExecutor(out, jobs=jobs, threads=threads, device=device, slurm=slurm, wait=wait,
                            name=name, run_seconds=run_seconds, check_time=check_time)


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


class _RayWorker:
    """The Ray actor of :class:`RayExecutor`: it sets the thread variables, imports the work
    function (named ``module:qualname``) once, when it starts, then runs the units it is sent."""

    def __init__(self, target: str, threads: int) -> None:
        import importlib

        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
        module, _, name = target.partition(":")
        self.work = getattr(importlib.import_module(module), name)

    def run(self, unit: Unit) -> Record:
        return self.work(unit)


class RayExecutor:
    """A pool of Ray actors (:class:`_RayWorker`, one per run at once) on a Ray cluster
    (``address``), or on a local Ray instance of jobs × threads CPUs (module docs). The pool has
    as many actors as the cluster's CPUs hold runs of `threads` (on the local instance: `jobs`),
    at most one per unit; an actor that dies (out of memory, a signal) is reported as the unit's
    error and replaced for the next unit, and each actor ends as soon as no unit is left for it
    (releasing its CPUs and GPU)."""

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
        if not units:
            return
        cpus = int(ray.cluster_resources().get("CPU", self.jobs * self.threads))
        size = min(max(self.jobs, cpus // self.threads, 1), len(units))
        actor = ray.remote(num_cpus=self.threads, num_gpus=self._gpus(), max_restarts=0,
                           max_task_retries=0)(_RayWorker)
        target = f"{work.__module__}:{work.__qualname__}"
        pending = list(reversed(units))
        workers: list[Any] = [actor.remote(target, self.threads) for _ in range(size)]
        calls: dict[Any, tuple[int, Unit]] = {}

        def next_unit(i: int) -> None:
            if pending:
                unit = pending.pop()
                calls[workers[i].run.remote(unit)] = (i, unit)
                started(unit)
            else:  # nothing left for this actor: end it, its CPUs and GPU go back to the cluster
                stop(i)

        def stop(i: int) -> None:
            if workers[i] is not None:
                with contextlib.suppress(Exception):
                    ray.kill(workers[i])
                workers[i] = None

        try:
            for i in range(size):
                next_unit(i)
            while calls:
                done, _ = ray.wait(list(calls), num_returns=1)
                for ref in done:
                    i, unit = calls.pop(ref)
                    try:
                        record, error = ray.get(ref), None
                    except Exception as exc:  # the actor's process died, or Ray lost it
                        record, error = None, f"ray: {type(exc).__name__}: {one_line(exc)}"
                        if isinstance(exc, ray.exceptions.RayActorError):  # a fresh one
                            stop(i)
                            workers[i] = actor.remote(target, self.threads)
                    finished(unit, record, error)
                    next_unit(i)
        finally:  # interrupted: end the actors, and the runs they hold (resumable, like a SIGKILL)
            for i in range(len(workers)):
                stop(i)



# ----------------------------------------------------------------------------- submitit (SLURM)

SUBMITIT_DIR = "submitit"
"""The folder of a sweep directory that holds submitit's files: ``logs/<job id>/`` (each job's
pickled call, its stdout and stderr, its pickled result) and :data:`JOBS_FILE`."""
JOBS_FILE = "jobs.json"
"""``OUT/submitit/jobs.json``: the jobs submitted for each unit, oldest first (``{"units": {run:
[{"id", "cluster", "submitted"}, ...]}}``), written atomically right after each submission."""
CLUSTER_VARIABLE = "GENPROBE_SUBMITIT_CLUSTER"
"""Environment variable choosing where :class:`SubmititExecutor` sends its jobs: ``slurm`` (the
default) or ``local``, submitit's LocalExecutor: each job a process on this machine, with the
same pickled call, logs, time limit, requeue and collection as on SLURM, but no ``sbatch``. For
tests, and to try a sweep's SLURM set-up on one machine."""
CLUSTERS = ("slurm", "local")
SLURM_KEYS = ("partition", "time", "cpus", "gpus", "mem")
"""The SLURM options of a job: partition (a name, or several comma-separated), time (the time
limit, minutes), cpus (CPUs per task), gpus (GPUs per node), mem (memory, GB)."""
SLURM_TIME_MIN = 60
"""The time limit of a job when none is given (minutes): an hour holds one run of the built-in
sweeps many times over, and a run that outlives its limit is requeued (up to
:data:`MAX_TIMEOUTS` times) and resumes from what it saved. submitit's own default is 5 minutes."""
MAX_TIMEOUTS = 3
"""How many times submitit requeues a job that reaches its time limit (each time the run resumes
from its last saved epoch and probe result) before the run is recorded as failed."""
JOB_START_S = 60.0
"""What a job needs besides its run (seconds): Python, torch and genprobe starting on a node
from shared storage. The time limit must hold the longest finished run plus this."""
POLL_S = {"slurm": 30.0, "local": 0.5}
"""How often a waiting sweep asks which of its jobs still run (seconds): ``squeue`` on SLURM
(asked no more often than this: a cluster's controller serves every user), the process table
for local jobs."""
RESULT_WAIT_S = {"slurm": 15.0, "local": 0.0}
"""How long a job that has left the queue gets for its result file to appear before it is
called dead (seconds; the waiting goes on meanwhile): a shared file system may show a file
written on another node late (submitit waits as long)."""
COMMAND_TIMEOUT_S = 60.0
"""How long ``sinfo`` or ``squeue`` may take before it is called unreachable (seconds)."""
NODE_LOCAL_PATHS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
"""Folders that are local to each machine on a cluster, whatever file system holds them here."""
NODE_LOCAL_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "overlay", "zram")
"""File system types that only the machine mounting them sees (memory, a container's own layer)."""
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cifs", "smb3", "smbfs",
                      "panfs", "wekafs", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.ceph",
                      "fuse.juicefs", "fuse.beegfs", "9p", "afs", "orangefs", "pvfs2", "cvmfs",
                      "virtiofs", "gcsfuse", "fuse.gcsfuse", "fuse.s3fs", "fuse.rclone")
"""File system types served over the network: a cluster's nodes can all mount them (whether they
do is the cluster's set-up, which no file system type can tell)."""


def time_limit_problem(limit: int, run_seconds: float,
                       basis: str = "the longest finished run of this sweep took") -> str | None:
    """Why a job's time limit of `limit` minutes cannot hold a run of `run_seconds` seconds plus
    :data:`JOB_START_S` (one line: `basis` says where the run's seconds come from, the fix names
    the least limit that would); None when it can."""
    import math

    needed = run_seconds + JOB_START_S
    if limit * 60 >= needed:
        return None
    return (f"slurm time {limit} min cannot hold one run: {basis} {run_seconds / 60:.1f} min (and a "
            f"job needs {JOB_START_S:g} s to start); give --slurm-time {math.ceil(needed / 60)} or more")


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor submitit needs submitit: pip install 'genprobe[submitit]'") \
            from None
    return submitit


def check_slurm(options: Mapping[str, Any] | None, source: str = "slurm") -> dict[str, Any]:
    """The SLURM options of :data:`SLURM_KEYS` with their types checked (ConfigError, one line,
    naming the option as ``SOURCE time``); absent ones are left out."""
    from .errors import did_you_mean
    from .options import check_int, check_number

    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{source} must be a mapping like {{partition: gpu, time: 120}}, "
                          f"got {options!r}")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in SLURM_KEYS:
            raise ConfigError(f"{source}: unknown option {key!r}; {did_you_mean(key, SLURM_KEYS)}"
                              f"options: {', '.join(SLURM_KEYS)}")
        if value is None:
            continue
        if key == "partition":
            if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
                raise ConfigError(f"{source} partition must be a partition name (or several, "
                                  f"comma-separated), got {value!r}")
            checked[key] = value
        elif key == "mem":
            checked[key] = check_number(f"{source} mem (GB)", value, low=1e-3)
        else:
            checked[key] = check_int(f"{source} {key}" + (" (minutes)" if key == "time" else ""),
                                     value, 0 if key == "gpus" else 1)
    return checked


def _run(argv: list[str]) -> str:
    """stdout of `argv`; ConfigError (one line) when it fails or outlasts :data:`COMMAND_TIMEOUT_S`."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"`{' '.join(argv)}` failed: {first_line(exc)}") from None
    if done.returncode:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"`{' '.join(argv)}` failed (exit code {done.returncode}): "
                          f"{why[0] if why else 'no message'}")
    return done.stdout


def _mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of /proc/mounts (octal escapes decoded)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].encode().decode("unicode_escape")
            out.append((point, fields[2]))
    return out


def storage_problem(path: str | Path, mounts: str | None = None) -> tuple[str | None, str | None]:
    """Whether the jobs of a cluster could see the sweep directory `path`: (an error, None) when
    it certainly cannot (under one of :data:`NODE_LOCAL_PATHS`, or on a file system of
    :data:`NODE_LOCAL_FILESYSTEMS`), (None, a note) when it cannot be told (a local disk type
    such as ext4 or xfs may be the cluster's shared disk, exported from this machine; no
    ``/proc/mounts``), (None, None) when it is on a network file system (:data:`SHARED_FILESYSTEMS`).
    `mounts`: the text of ``/proc/mounts`` (read when None)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    real = Path(os.path.realpath(existing))
    for folder in NODE_LOCAL_PATHS:
        if real == Path(folder) or Path(folder) in real.parents:
            return (f"sweep directory {path} is under {folder}, which each machine has for itself: "
                    "SLURM jobs on other nodes cannot see it; put it on storage the nodes share "
                    "(a home, project or scratch file system)", None)
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None, (f"cannot tell whether {path} is on storage the cluster's nodes share (no "
                          "/proc/mounts here); the jobs fail if they cannot see it")
    held = None  # the deepest mount point holding it; of equal ones the last (it covers the others)
    for point, kind in _mounts(mounts):
        if (real == Path(point) or Path(point) in real.parents) \
                and (held is None or len(point) >= len(held[0])):
            held = (point, kind)
    if held is None:
        return None, f"cannot tell whether {path} is on storage the cluster's nodes share"
    point, kind = held
    if kind in NODE_LOCAL_FILESYSTEMS:
        return (f"sweep directory {path} is on a file system of type {kind} (mounted at {point}), "
                "which only this machine sees: SLURM jobs on other nodes cannot see it; put it on "
                "storage the nodes share (a home, project or scratch file system)", None)
    if kind in SHARED_FILESYSTEMS or kind.startswith("nfs"):
        return None, None
    return None, (f"cannot tell whether {path} ({kind} at {point}) is seen by the cluster's nodes: "
                  f"{kind} is usually a local disk, unless the cluster shares it; "
                  "the jobs fail if they cannot see it")


def _partitions() -> list[str] | None:
    """The cluster's partitions (``sinfo``); None when ``sinfo`` is not on PATH."""
    import shutil

    if shutil.which("sinfo") is None:
        return None
    names = _run(["sinfo", "-h", "-o", "%R"]).split()
    return sorted(set(names))


def _local_job_alive(job_id: str) -> bool:
    """Whether the local job `job_id` (the process id of submitit's job controller) still runs:
    the process exists, is not a zombie, and is a submitit controller (a reused id is not)."""
    try:
        pid = int(job_id)
    except ValueError:
        return False
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            command = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and b"submitit.local._local" in command
    try:  # no /proc (macOS): the process exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_alive() -> set[str]:
    """The ids of this user's jobs that SLURM still holds (pending, running, requeued, suspended,
    completing), one per array task (``squeue -r``); ConfigError when ``squeue`` fails."""
    import getpass

    text = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"])
    return set(text.split())


def alive_jobs(entries: list[Mapping[str, Any]]) -> set[str]:
    """The ids among `entries` (``{"id", "cluster"}`` of :data:`JOBS_FILE`) of jobs still queued
    or running. ConfigError when SLURM cannot be asked (``squeue`` missing or failing)."""
    import shutil

    alive = set()
    if any(e["cluster"] == "slurm" for e in entries):
        if shutil.which("squeue") is None:
            raise ConfigError("cannot tell which SLURM jobs of this sweep still run: squeue is not "
                              "on PATH; run genprobe sweep where SLURM's commands are (a login node)")
        held = _slurm_alive()
        alive |= {e["id"] for e in entries if e["cluster"] == "slurm" and e["id"] in held}
    alive |= {e["id"] for e in entries if e["cluster"] == "local" and _local_job_alive(e["id"])}
    return alive


def read_jobs(out: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{unit's run: its jobs, oldest first} of a sweep directory's :data:`JOBS_FILE`; empty when
    there is none (an unreadable one too: its jobs cannot be found, and say so)."""
    import json

    path = Path(out) / SUBMITIT_DIR / JOBS_FILE
    if not path.is_file():
        return {}
    try:
        units = json.loads(path.read_text())["units"]
        if not isinstance(units, dict):
            raise ValueError
        return {str(k): [dict(e) for e in v if isinstance(e, dict) and "id" in e and "cluster" in e]
                for k, v in units.items() if isinstance(v, list)}
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s cannot be read: the jobs it lists are not waited for", path)
        return {}


def running_jobs(out: str | Path, units: list[str]) -> list[str]:
    """The jobs submitted by ``--executor submitit`` for `units` of the sweep directory `out`
    that still run (their last job each); empty when none, or when SLURM cannot be asked here."""
    last = [entries[-1] for unit, entries in read_jobs(out).items() if unit in units and entries]
    if not last:
        return []
    try:
        return sorted(alive_jobs(last))
    except ConfigError as exc:
        log.warning("%s", exc)
        return []


class _JobWork:
    """The call a job runs: the work function, named ``module:qualname`` and imported in the job
    once the thread variables are set (as the local executor's workers do), and a
    ``checkpoint`` that submitit calls on preemption or at the time limit: the same call is
    requeued, and the unit resumes from what it saved (a run's last epoch, its probe results)."""

    def __init__(self, target: str, threads: int) -> None:
        self.target, self.threads = target, threads

    def __call__(self, unit: Unit) -> Record:
        import importlib

        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(self.threads)))
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(unit)

    def checkpoint(self, unit: Unit):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, unit)


class SubmititExecutor:
    """One SLURM job per unit, through submitit, the units submitted together as one job array
    (one ``sbatch`` call, one entry in the queue for the lot; the scheduler starts each task
    when resources free up, at most `jobs` at once). An array rather than one ``sbatch`` per
    unit: a sweep of hundreds of runs would otherwise hit the submission limits many clusters
    set, and ``--jobs`` maps onto the array's ``%`` throttle.

    `out`: the sweep directory (it must be on storage the nodes share: checked); the jobs' files
    go in ``OUT/submitit/``. `slurm`: options of :data:`SLURM_KEYS` (:func:`check_slurm`;
    time defaults to :data:`SLURM_TIME_MIN` minutes, cpus to `threads`, gpus to 0). `threads`:
    intra-op threads per run (default: cpus, else 1); more threads than cpus is an error. `jobs`:
    at most this many runs at once (default: as many as the scheduler starts). `device`:
    ``cuda`` needs gpus >= 1. `wait`: False to submit and return (the next invocation collects).
    `run_seconds`: the longest finished run of this sweep, to check the time limit (None: it cannot
    be checked, and a warning says so; `check_time` False: the caller checks it, see
    :func:`time_limit_problem`). `cluster`: ``slurm`` or ``local`` (default: the
    :data:`CLUSTER_VARIABLE` environment variable, else slurm).

    Every check happens here, before anything is written or submitted: submitit installed,
    ``sbatch`` and ``srun`` on PATH, the partition known to ``sinfo`` (skipped with a warning without it),
    the sweep directory on shared storage (:func:`storage_problem`; a local cluster skips it),
    the time limit against `run_seconds` plus :data:`JOB_START_S`.

    :meth:`run` first looks up the jobs :data:`JOBS_FILE` lists for the units: a unit whose last
    job is still queued or running is waited for, not submitted again; the others are submitted.
    A job that ends is read from its result file (the unit's record); one that ended without a
    result (killed, out of memory, cancelled, its node lost) is reported as an error, which the
    sweep records as a failed run, retried by its next invocation. Preemption and the time limit
    are handled by submitit itself: the job is requeued (:class:`_JobWork`) and the run resumes.
    Ctrl-C stops the waiting, never the jobs."""

    def __init__(self, out: str | Path, *, jobs: int | None = None, threads: int | None = None,
                 device: str = "auto", slurm: Mapping[str, Any] | None = None, wait: bool = True,
                 name: str = "genprobe", run_seconds: float | None = None,
                 cluster: str | None = None, check_time: bool = True) -> None:
        import shutil

        from .options import check_int

        self.submitit = _import_submitit()
        self.out = Path(out)
        self.folder = self.out / SUBMITIT_DIR
        self.cluster = cluster or os.environ.get(CLUSTER_VARIABLE) or "slurm"
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"unknown submitit cluster {self.cluster!r} (from {CLUSTER_VARIABLE}); "
                              "choose slurm or local")
        options = check_slurm(slurm)
        self.jobs = check_int("jobs", jobs, 1, optional=True)
        check_int("threads", threads, 1, optional=True)
        cpus = options.get("cpus", threads or 1)
        self.threads = threads if threads is not None else cpus
        if self.threads > cpus:
            raise ConfigError(f"threads={self.threads} is more than slurm cpus={cpus}: each run "
                              "would spin more threads than its job has CPUs; raise --slurm-cpus "
                              "or lower --threads")
        self.options = {"time": SLURM_TIME_MIN, "gpus": 0} | options | {"cpus": cpus}
        if device.startswith("cuda") and self.options["gpus"] == 0:
            raise ConfigError(f"--device {device} with no GPU per job; add --slurm-gpus 1 "
                              "(or slurm: {gpus: 1} in the config)")
        self.wait, self.name, self.device = wait, name, device
        self.submitted = 0
        self.running = 0
        if self.cluster == "slurm":
            missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
            if missing:
                raise ConfigError(f"--executor submitit submits with sbatch and starts with srun; "
                                  f"{' and '.join(missing)} not on PATH: run genprobe sweep on a "
                                  "SLURM login node")
            self._check_partition()
            error, note = storage_problem(self.out)
            if error:
                raise ConfigError(error)
            if note:
                log.warning("%s", note)
        if check_time:
            self._check_time(run_seconds)

    def _check_partition(self) -> None:
        from .errors import did_you_mean

        wanted = self.options.get("partition")
        if wanted is None:
            return
        known = _partitions()
        if known is None:
            log.warning("sinfo is not on PATH: partition %r is not checked before submitting", wanted)
            return
        for part in wanted.split(","):
            if part not in known:
                raise ConfigError(f"unknown slurm partition {part!r}; {did_you_mean(part, known)}"
                                  f"partitions (sinfo): {', '.join(known)}")

    def _check_time(self, run_seconds: float | None) -> None:
        import math

        if run_seconds is None or not math.isfinite(run_seconds):
            log.warning("the time limit of %d min cannot be checked against a run's cost: no run of "
                        "this sweep has finished yet to estimate it from", self.options["time"])
            return
        problem = time_limit_problem(self.options["time"], run_seconds)
        if problem:
            raise ConfigError(problem)

    def describe(self) -> str:
        where = self.options.get("partition", "the default partition")
        mem = f", {self.options['mem']:g} GB" if "mem" in self.options else ""
        return (f"submitit on {self.cluster} ({where}), jobs of {self.options['time']} min, "
                f"{self.options['cpus']} CPU(s), {self.options['gpus']} GPU(s){mem}, "
                f"{self.threads} thread(s) per run")

    def __enter__(self) -> SubmititExecutor:
        return self

    def __exit__(self, *exc) -> None:
        pass

    # -- the jobs file

    def _write_jobs(self, units: dict[str, list[dict[str, Any]]]) -> None:
        import json

        from .outputs import write_text_atomic

        self.folder.mkdir(exist_ok=True)
        write_text_atomic(self.folder / JOBS_FILE, json.dumps({"units": units}, indent=1) + "\n")

    # -- submitting, waiting

    def _executor(self):
        executor = self.submitit.AutoExecutor(folder=self.folder / "logs" / "%j",
                                              cluster=self.cluster,
                                              slurm_max_num_timeout=MAX_TIMEOUTS,
                                              local_max_num_timeout=MAX_TIMEOUTS)
        options = self.options
        parameters = {"name": f"genprobe-{self.name}", "timeout_min": options["time"],
                      "cpus_per_task": options["cpus"], "gpus_per_node": options["gpus"],
                      "mem_gb": options.get("mem"), "slurm_partition": options.get("partition"),
                      "slurm_array_parallelism": self.jobs}
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        return executor

    def _submit(self, units: list[Unit], work: Work) -> list[Any]:
        """Submit `units` as one array; their submitit jobs. ConfigError when submission fails."""
        call = _JobWork(f"{work.__module__}:{work.__qualname__}", self.threads)
        executor = self._executor()
        jobs: list[Any] = []
        try:
            with executor.batch():
                for unit in units:
                    jobs.append(executor.submit(call, unit))
        except Exception as exc:  # sbatch's refusal (an account, a QOS...), as submitit raises it
            what = "sbatch refused the jobs" if self.cluster == "slurm" else "the local jobs did not start"
            raise ConfigError(f"{what}: {one_line(exc, 300)}") from None
        return jobs

    def _job(self, job_id: str, cluster: str):
        """The submitit job `job_id` of an earlier invocation, to read its result."""
        job_class = self.submitit.SlurmJob if cluster == "slurm" else self.submitit.LocalJob
        return job_class(folder=self.folder / "logs" / "%j", job_id=job_id)

    @staticmethod
    def _outcome(job_id: str, cluster: str, job) -> tuple[Record | None, str | None]:
        """The (record, None) of an ended job from its result file, or (None, why)."""
        if not job.paths.result_pickle.exists():
            return None, (f"its {cluster} job {job_id} ended without a result (killed, out of "
                          f"memory, cancelled?); its log: {job.paths.stderr}")
        try:
            return job.result(), None
        except Exception as exc:  # the work records its own failures; this is a last resort
            return None, f"its {cluster} job {job_id} failed: {one_line(exc, 300)}"

    def run(self, units: list[Unit], work: Work, *, started: Started, finished: Finished) -> None:
        """Submit the units not already queued or running (class docs); unless `wait` is
        False, wait for every job and report each unit as its job ends. Afterwards
        :attr:`submitted` counts the jobs this call submitted, :attr:`running` those left running."""
        history = read_jobs(self.out)
        last = {u["run"]: history[u["run"]][-1] for u in units if history.get(u["run"])}
        alive = alive_jobs(list(last.values()))  # before submitting: a failure submits nothing
        waiting: dict[str, tuple[Unit, str, str, Any]] = {}
        fresh = []
        for unit in units:
            entry = last.get(unit["run"])
            if entry is not None and entry["id"] in alive:
                waiting[unit["run"]] = (unit, entry["id"], entry["cluster"], None)
            else:
                fresh.append(unit)
        if waiting:
            log.info("%d job(s) of this sweep still queued or running: waiting for them, not "
                     "submitting them again", len(waiting))
        if fresh:
            jobs = self._submit(fresh, work)
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for unit, job in zip(fresh, jobs, strict=True):
                history.setdefault(unit["run"], []).append(
                    {"id": str(job.job_id), "cluster": self.cluster, "submitted": now})
                waiting[unit["run"]] = (unit, str(job.job_id), self.cluster, job)
            self._write_jobs(history)
            log.info("submitted %d job(s) to %s: %s", len(jobs), self.cluster,
                     ", ".join(str(j.job_id) for j in jobs[:5]) + (" ..." if len(jobs) > 5 else ""))
        self.submitted = len(fresh)
        for unit, *_ in waiting.values():
            started(unit)
        self.running = len(waiting)
        if not self.wait:
            return
        grace: dict[str, float] = {}  # an ended job's result may show late on shared storage
        while waiting:
            reported = 0
            for run in self._ended(waiting):
                unit, job_id, cluster, job = waiting[run]
                job = job if job is not None else self._job(job_id, cluster)
                waiting[run] = (unit, job_id, cluster, job)
                if not job.paths.result_pickle.exists() and \
                        time.monotonic() < grace.setdefault(run, time.monotonic() + RESULT_WAIT_S[cluster]):
                    continue
                del waiting[run]
                self.running -= 1
                reported += 1
                finished(unit, *self._outcome(job_id, cluster, job))
            if waiting and not reported:
                time.sleep(min(POLL_S[c] for _, _, c, _ in waiting.values()))

    def _ended(self, waiting: dict[str, tuple[Unit, str, str, Any]]) -> list[str]:
        """The units of `waiting` whose job has ended (none when SLURM cannot be asked now:
        a warning says so, and the next poll asks again)."""
        ended = []
        slurm = [(run, job_id) for run, (_, job_id, cluster, _) in waiting.items() if cluster == "slurm"]
        if slurm:
            try:
                held = _slurm_alive()
            except ConfigError as exc:
                log.warning("%s; asking again in %g s", exc, POLL_S["slurm"])
                held = {job_id for _, job_id in slurm}
            ended += [run for run, job_id in slurm if job_id not in held]
        for run, (_, job_id, cluster, job) in waiting.items():
            if cluster != "local":
                continue
            # this call's own jobs: poll the controller (which reaps it); earlier ones: by pid
            running = job.state == "RUNNING" if job is not None else _local_job_alive(job_id)
            if not running:
                ended.append(run)
        return ended


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "SubmititExecutor", "alive_jobs",
           "available_cores", "check_address", "check_jobs", "check_slurm", "core_sets",
           "default_threads", "make_executor", "read_jobs", "running_jobs", "storage_problem",
           "time_limit_problem"]
