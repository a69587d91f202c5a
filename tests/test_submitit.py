"""``genprobe sweep --executor submitit`` (genprobe.executors.SubmititExecutor): a job per run,
run by submitit's local cluster (real processes, the same pickled call, logs, time limit,
requeue and collection as on SLURM, but no sbatch), gives the table ``--executor local`` gives:
waited for, submitted and collected later, with a job killed mid-run, with a job preempted and
requeued. The SLURM side (the sbatch script, job ids, which jobs still run) is checked against
stand-in ``sbatch``, ``srun``, ``sinfo`` and ``squeue`` scripts; bad input is one line, before
any job is submitted.

The sweep is test_sweep's tiny one (two 2-epoch networks, two probes, one thread per run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from genprobe import executors  # noqa: E402
from genprobe.errors import ConfigError  # noqa: E402
from genprobe.sweep import SweepConfig, read_table, run_sweep  # noqa: E402
from invoke import call  # noqa: E402
from test_sweep import TINY, same, tiny, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
SLURM = {"time": 30, "cpus": 1}
"""The config's slurm: section (what the local cluster uses: the time limit; ignored by
--executor local)."""


def runs() -> list[str]:
    return [r.id for r in SweepConfig.from_dict(tiny()).expand()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep with --executor local, in this process."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    outcome = run_sweep(SweepConfig.from_dict(tiny(slurm=SLURM)), out, progress=False)
    assert outcome.done == 2
    return out


@pytest.fixture
def local_cluster(monkeypatch):
    """Jobs on submitit's local cluster, able to import the tests' work functions."""
    monkeypatch.setenv(executors.CLUSTER_VARIABLE, "local")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def stalled(monkeypatch, tmp_path, local_cluster):
    """The sweep's work stops once in the second run's selectivity probe (tests/submitit_work.py);
    returns the marker file that then holds the job's process id."""
    import genprobe.sweep.run
    import submitit_work

    marker = tmp_path / "stalled"
    monkeypatch.setenv("STALL_MARKER", str(marker))
    monkeypatch.setenv("STALL_RUN", runs()[1])
    monkeypatch.setattr(genprobe.sweep.run, "run_unit", submitit_work.stall_in_selectivity)
    yield marker
    if marker.exists():  # a failed test leaves no job sleeping behind it
        pid = int(marker.read_text())
        try:
            if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_for(marker: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, f"no job reached the stall in {timeout:g} s"
        time.sleep(0.05)
    return int(marker.read_text())


def jobs_of(out: Path) -> dict[str, list[str]]:
    units = json.loads((out / "submitit" / "jobs.json").read_text())["units"]
    return {run: [e["id"] for e in entries] for run, entries in units.items()}


def sweep(capsys, config: Path, out: Path, *args) -> tuple[int, str, str]:
    return call(["sweep", config, "--out", out, "--executor", "submitit", *args], capsys)


# ----------------------------------------------------------------------------- end to end


def test_the_same_table_as_local(reference, local_cluster, tmp_path, capsys, caplog):
    config, out = write(tmp_path / "c.yaml", tiny(slurm=SLURM)), tmp_path / "out"
    code, stdout, err = sweep(capsys, config, out)
    assert code == 0, err
    assert "2 runs, 2 done (0 from before), 0 failed" in stdout
    # no finished run yet to estimate a run's cost from: the time limit cannot be checked
    assert "time limit of 30 min cannot be checked" in caplog.text
    same(read_table(out), read_table(reference))
    jobs = jobs_of(out)
    assert sorted(jobs) == sorted(runs()) and all(len(ids) == 1 for ids in jobs.values())
    for (job,) in jobs.values():  # submitit's files, inside the sweep directory
        assert (out / "submitit" / "logs" / job / f"{job}_0_result.pkl").is_file()
    code, stdout, err = sweep(capsys, config, out)  # done: nothing is submitted again
    assert code == 0 and "2 done (2 from before)" in stdout and jobs_of(out) == jobs


def test_submit_return_kill_a_job_then_collect(reference, stalled, tmp_path, capsys):
    """--no-wait submits and returns; while a job runs, a second --no-wait submits nothing and
    --executor local refuses the directory; the job is SIGKILLed mid-run (as a scheduler kills
    one); collecting submits it again, the run resumes from its saved training and first probe,
    and the table is --executor local's."""
    config, out = write(tmp_path / "c.yaml", tiny(slurm=SLURM)), tmp_path / "out"
    first, second = runs()
    code, stdout, err = sweep(capsys, config, out, "--no-wait")
    assert code == 0, err
    assert stdout.startswith("submitted 2 job(s); 0 of 2 runs done")
    assert f"genprobe sweep {config} --out {out} --executor submitit" in stdout
    pid = wait_for(stalled)
    jobs = jobs_of(out)
    code, stdout, _ = sweep(capsys, config, out, "--no-wait")
    assert code == 0 and stdout.startswith("submitted 0 job(s)") and jobs_of(out) == jobs
    code, _, err = call(["sweep", config, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "--executor submitit submitted still run in" in err
    saved = {p: p.stat().st_mtime_ns for p in (out / "runs" / second / "final.safetensors",
                                               out / "runs" / second / "probes" / "robustness")}
    os.kill(pid, signal.SIGKILL)
    while executors._local_job_alive(jobs[second][0]):  # its controller sees the task die
        time.sleep(0.05)
    code, stdout, err = sweep(capsys, config, out)
    assert code == 0, err
    assert "2 runs, 2 done" in stdout
    same(read_table(out), read_table(reference))
    after = jobs_of(out)
    assert after[first] == jobs[first] and after[second][0] == jobs[second][0]
    assert len(after[second]) == 2  # submitted again, once
    assert {p: p.stat().st_mtime_ns for p in saved} == saved  # resumed, not redone
    leftovers = [p for p in (out / "runs").rglob(".*")
                 if p.name not in (".genprobe-run", ".genprobe-result")]
    assert not leftovers


def test_a_preempted_job_is_requeued_and_resumes(reference, stalled, tmp_path, capsys):
    """submitit's preemption signal (USR2) mid-run: the job checkpoints (the same call) and is
    requeued by submitit itself, not submitted again; the run resumes and the table is the same."""
    config, out = write(tmp_path / "c.yaml", tiny(slurm=SLURM)), tmp_path / "out"
    code, _, err = sweep(capsys, config, out, "--no-wait")
    assert code == 0, err
    pid = wait_for(stalled)
    os.kill(pid, signal.SIGUSR2)
    code, stdout, err = sweep(capsys, config, out)
    assert code == 0, err
    same(read_table(out), read_table(reference))
    jobs = jobs_of(out)
    assert all(len(ids) == 1 for ids in jobs.values())
    (job,) = jobs[runs()[1]]
    log = (out / "submitit" / "logs" / job / f"{job}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in log and "Calling checkpoint method" in log
    assert f"Requeued job {job}" in log and log.count("Job completed successfully") == 1


# ----------------------------------------------------------------------------- SLURM, stood in for


SBATCH = """#!/bin/sh
n=$(ls "$FAKE_SLURM" | grep -c '^sbatch-')
cp "$1" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch (keeps each script it is given, prints a job id from 4242 on), srun, sinfo
    (partitions cpu and gpu) and squeue (prints $FAKE_SLURM/queue) on PATH, nothing else."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scripts = {"sbatch": SBATCH, "srun": "#!/bin/sh\nexit 0\n",
               "sinfo": "#!/bin/sh\nprintf 'cpu\\ngpu\\ngpu\\n'\n",
               "squeue": "#!/bin/sh\ncat \"$FAKE_SLURM/queue\" 2>/dev/null\n"}
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    for tool in ("cat", "cp", "ls", "grep", "printf"):
        (folder / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    monkeypatch.delenv(executors.CLUSTER_VARIABLE, raising=False)
    return folder


def test_the_slurm_script_job_ids_and_which_jobs_still_run(fake_slurm, tmp_path, capsys,
                                                           monkeypatch):
    """The options reach sbatch as an array of one task per run (throttled by --jobs); its job
    ids are recorded; a later invocation submits again only the runs whose job squeue no longer
    lists. (/tmp counts as shared here: the storage check has its own test.)"""
    monkeypatch.setattr(executors, "NODE_LOCAL_PATHS", ())
    config, out = write(tmp_path / "c.yaml", tiny(slurm={"partition": "cpu", "time": 30})), tmp_path / "out"
    code, stdout, err = sweep(capsys, config, out, "--no-wait", "--slurm-partition", "gpu",
                              "--slurm-cpus", "2", "--slurm-gpus", "1", "--slurm-mem", "4",
                              "--jobs", "1", "--threads", "1")
    assert code == 0, err
    assert stdout.startswith("submitted 2 job(s)")
    script = (fake_slurm / "sbatch-0.sh").read_text()
    for line in ("--partition=gpu", "--time=30", "--cpus-per-task=2", "--gpus-per-node=1",
                 "--mem=4GB", "--array=0-1%1", "--job-name=genprobe-t", "--signal=USR2@"):
        assert f"#SBATCH {line}" in script, line
    assert str(out / "submitit" / "logs") in script
    first, second = runs()
    assert jobs_of(out) == {first: ["4242_0"], second: ["4242_1"]}
    (fake_slurm / "queue").write_text("4242_0\n999\n")  # the second run's job is gone
    code, stdout, err = sweep(capsys, config, out, "--no-wait")
    assert code == 0, err
    assert stdout.startswith("submitted 1 job(s) (1 more still queued or running from before)")
    assert "--partition=cpu" in (fake_slurm / "sbatch-1.sh").read_text()  # the config's, now
    assert jobs_of(out) == {first: ["4242_0"], second: ["4242_1", "4243"]}
    (fake_slurm / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: timed out' >&2\n"
                                       "exit 1\n")
    code, _, err = sweep(capsys, config, out, "--no-wait")
    assert code == 2 and err.count("\n") == 1 and "squeue" in err and "timed out" in err
    assert not (fake_slurm / "sbatch-2.sh").exists()
    # collecting: both jobs gone, so both runs go again (an array, 4244); these leave the
    # queue without a result (no node ran them), so they are recorded as crashed runs
    (fake_slurm / "squeue").write_text("#!/bin/sh\nexit 0\n")
    monkeypatch.setitem(executors.POLL_S, "slurm", 0.05)
    monkeypatch.setitem(executors.RESULT_WAIT_S, "slurm", 0.2)
    code, _, err = sweep(capsys, config, out)
    assert code == 1
    assert jobs_of(out) == {first: ["4242_0", "4244_0"], second: ["4242_1", "4243", "4244_1"]}
    table = read_table(out)
    assert list(table.status) == ["failed", "failed"]
    assert table.error[0].startswith("crashed: its slurm job 4244_0 ended without a result "
                                     "(killed, out of memory, cancelled?); its log: ")


# ----------------------------------------------------------------------------- bad input


def _outside_node_local_paths() -> Path:
    """An existing folder, two levels deep at least, under none of NODE_LOCAL_PATHS (/tmp...):
    the tests' folder unless the clone is itself under one (a CI checkout in /tmp)."""
    for folder in (TESTS, Path.home(), Path(sys.prefix)):
        real = Path(os.path.realpath(folder))
        if len(real.parts) > 2 and not any(real == Path(p) or Path(p) in real.parents
                                           for p in executors.NODE_LOCAL_PATHS):
            return real
    pytest.skip("no folder outside the node-local paths to test with")


def test_storage_that_the_nodes_cannot_see():
    here = _outside_node_local_paths()
    mounts = f"/dev/vda / ext4 rw 0 0\ntmpfs {here} tmpfs rw 0 0\nsrv:/home {here.parent} nfs4 rw 0 0\n"
    error, note = executors.storage_problem(here / "sweep", mounts)
    assert note is None and f"is on a file system of type tmpfs (mounted at {here})" in error
    assert executors.storage_problem(here.parent / "x", mounts) == (None, None)  # on nfs4
    error, note = executors.storage_problem(here.parent / "x", "/dev/vda / ext4 rw 0 0\n")
    assert error is None and "cannot tell whether" in note and "(ext4 at /)" in note
    error, _ = executors.storage_problem("/tmp/somewhere/sweep", "/dev/vda / ext4 rw 0 0\n")
    assert "is under /tmp, which each machine has for itself" in error
    spaced = f"srv:/x {str(here).replace(' ', chr(92) + '040')} lustre rw 0 0\n"
    assert executors.storage_problem(here, spaced) == (None, None)


def test_without_sinfo_the_partition_is_not_checked_and_said_so(fake_slurm, tmp_path, caplog):
    (fake_slurm / "sinfo").unlink()
    with pytest.raises(ConfigError, match="is under /tmp"):  # then the storage check
        executors.SubmititExecutor(tmp_path / "out", slurm={"partition": "nowhere"}, cluster="slurm")
    assert "sinfo is not on PATH: partition 'nowhere' is not checked" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_time_limit_shorter_than_a_finished_run(reference, local_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    record = out / "runs" / runs()[1] / "record.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"seconds": 7200.0}))
    config = write(tmp_path / "c.yaml", tiny(slurm=SLURM))
    code, _, err = sweep(capsys, config, out, "--slurm-time", "120")
    assert code == 2 and err.count("\n") == 1
    assert ("slurm time 120 min cannot hold one run: the longest finished run of this sweep took "
            "120.0 min (and a job needs 60 s to start); give --slurm-time 121 or more") in err
    assert not (out / "submitit").exists()


def test_submitit_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    config = write(tmp_path / "c.yaml", tiny())
    code, _, err = sweep(capsys, config, tmp_path / "out")
    assert code == 2
    assert err == ("genprobe: error: --executor submitit needs submitit: "
                   "pip install 'genprobe[submitit]'\n")
    with pytest.raises(ConfigError, match=r"pip install 'genprobe\[submitit\]'"):
        run_sweep(SweepConfig.from_dict(tiny()), tmp_path / "out", executor="submitit",
                  progress=False)
    assert not (tmp_path / "out").exists()


BAD = [
    # (changes to the tiny config, arguments, environment, the message)
    ({}, ["--no-wait"], "local", "--no-wait submits SLURM jobs and returns; add --executor submitit"),
    ({}, ["--slurm-time", "5"], "local", "--slurm-time set(s) SLURM jobs; add --executor submitit"),
    ({}, ["--executor", "submitit", "--slurm-time", "0"], "local",
     "slurm time (minutes) must be an integer >= 1, got 0"),
    ({}, ["--executor", "submitit", "--slurm-gpus", "-1"], "local", "gpus must be an integer >= 0"),
    ({}, ["--executor", "submitit", "--slurm-mem", "0"], "local", "slurm mem (GB) must be a finite"),
    ({}, ["--executor", "submitit", "--threads", "2", "--slurm-cpus", "1"], "local",
     "threads=2 is more than slurm cpus=1"),
    ({"slurm": {"tim": 5}}, ["--executor", "submitit"], "local",
     "slurm: unknown option 'tim'; did you mean 'time'? options: partition, time, cpus, gpus, mem"),
    ({"slurm": {"partition": "a b"}}, [], "local", "slurm partition must be a partition name"),
    ({"slurm": "gpu"}, [], "local", "slurm must be a mapping like"),
    ({}, ["--executor", "submitit"], "slurmm", "unknown submitit cluster 'slurmm'"),
    ({}, ["--executor", "submitit"], "no-slurm", "sbatch and srun not on PATH: run genprobe sweep "
     "on a SLURM login node"),
    ({}, ["--executor", "submitit", "--slurm-partition", "gpuu"], "fake-slurm",
     "unknown slurm partition 'gpuu'; did you mean 'gpu'? partitions (sinfo): cpu, gpu"),
    ({}, ["--executor", "submitit"], "fake-slurm", "is under /tmp, which each machine has for "
     "itself: SLURM jobs on other nodes cannot see it"),
]


@pytest.mark.parametrize("change, args, where, message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_is_one_line_and_submits_nothing(change, args, where, message, tmp_path, capsys,
                                                   monkeypatch, request):
    if where == "fake-slurm":
        request.getfixturevalue("fake_slurm")
    elif where == "no-slurm":
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.delenv(executors.CLUSTER_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(executors.CLUSTER_VARIABLE, where)
    config = write(tmp_path / "c.yaml", TINY | change)
    code, _, err = call(["sweep", config, "--out", tmp_path / "out", *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("genprobe: error: "), err
    assert message in err
    assert not (tmp_path / "out").exists()
    if where == "fake-slurm":
        assert not list(tmp_path.glob("bin/sbatch-*"))


def test_the_help_states_the_defaults(capsys):
    code, stdout, _ = call(["sweep", "--help"], capsys)
    text = " ".join(stdout.replace("│", " ").split())
    assert code == 0 and f"slurm: time, else {executors.SLURM_TIME_MIN})" in text
