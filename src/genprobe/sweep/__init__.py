"""Sweeps: train a family of models, probe every one of them, and tabulate the lot — resumably.

A sweep config (YAML) names the runs and the probes::

    name: lr-width                       # optional: the default --out is sweeps/<name or file stem>
    train: {arch: fcn, dataset: mnist1d, epochs: 10, depth: 2}   # the base of every run
    grid:                                # the cartesian product of these (last key fastest)
      lr: [0.01, 0.1]
      width: [32, 128]
      label_noise: [0.0, 0.2]
      seed: [0, 1]
    runs: [{lr: 0.5, width: 512}]        # an explicit list, instead of or besides the grid
    probes: {robustness: {draws: 1}, stiffness: {per_class: 10}}   # registered probes, options
    baselines: true                      # or false, or options of genprobe.measures.baselines
    measures:                            # user-defined measures: a function of a Subject -> float
      sharpness: mypackage.measures:sharpness          # column user.sharpness
      margin: {function: "mypackage.measures:margin", direction: -1}
    ranking: {min_models: 8, bootstrap: 1000}   # options of genprobe.measures.rank_correlation
    figures: true                        # save each probe's figure.png (false: faster)
    jobs: 2                              # optional defaults of --jobs and --threads
    threads: 1
    slurm: {partition: gpu, time: 120, cpus: 4, gpus: 1, mem: 16}   # --executor submitit's jobs

Keys in ``train``, ``grid`` and ``runs`` are :class:`~genprobe.zoo.train.TrainConfig` fields or
options of the run's architecture (``width``, ``depth``, ``batchnorm``, ``dropout`` ... go to
``arch_options``; ``genprobe archs`` lists them). Everything is checked before any run trains:
unknown keys (with the closest name), every run's training options, its data and model, and the
options of the probes and baselines against each run's model, data and planned checkpoints
(:func:`_check_builds`).

The sweep directory (``OUT``)::

    .genprobe-sweep       marker: genprobe writes only into a sweep directory it made
    .lock                 held (flock) by the sweep writing here; holds its pid
    sweep.yaml            the normalized config of the last invocation
    runs/<run id>/        a run directory as ``genprobe train`` writes it, with probes/<probe>/
                          (each probe's saved result) and record.json (see below)
    table.parquet         one row per run, in the config's expansion order (see :func:`read_table`)
    table.json            the table's column groups and counts (also in ``table.attrs``)
    submitit/             with --executor submitit: jobs.json (the jobs submitted for each run)
                          and logs/<job id>/ (submitit's pickled call, stdout, stderr, result)

A run's id is readable and a function of its training config alone (:func:`run_id`), so the same
config always maps to the same directory. A unit of work is one run: train it (continuing a run
killed mid-training from its last epoch), run each probe (a saved result that loads is reused),
the baselines, then write ``record.json`` atomically: hyper-parameters, final train/test error and
loss, every scalar measure, status ``done`` or ``failed`` with a one-line error, wall seconds and
seconds per phase (``phase_seconds``), the phases that reused saved work (``reused``: a finished
training, a probe result that loaded), the epochs this attempt trained (``epochs_trained``),
threads. Every file is written atomically, so a sweep killed at any point (SIGKILL included) and
run again redoes nothing that finished and ends with the same table.

``plan_sweep`` (``genprobe sweep --plan``) estimates what a sweep will cost before it starts: the
runs done and to do, the seconds of one run in each phase (from this sweep's finished runs, else
a short calibration), the total for the jobs (:mod:`genprobe.sweep.plan`).

Re-running a sweep skips runs whose record says ``done`` under the same probes and baselines, and
retries failed runs (their finished parts are reused). Changing a probe's options removes the
saved results of that probe (they no longer match the config) and re-runs it on every run,
reusing the training; changing the grid adds (or leaves out of the table) runs without touching
the others.
"""


from .config import SweepConfig, SweepRun, hyperparameters, run_id
from .layout import (
    build_table,
    measures_figure_paths,
    read_config,
    read_table,
    records,
    run_dir,
    varying,
)
from .plan import SweepPlan, plan_sweep
from .run import SweepOutcome, default_out, run_sweep
from .work import run_unit

__all__ = ["SweepConfig", "SweepOutcome", "SweepPlan", "SweepRun", "build_table", "default_out",
           "hyperparameters", "measures_figure_paths", "plan_sweep", "read_config", "read_table",
           "records", "run_dir", "run_id", "run_sweep", "run_unit", "varying"]

