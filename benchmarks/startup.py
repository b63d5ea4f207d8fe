"""A stage's fixed cost on a warm cluster: each stage on a tiny input, against a bare Ray job, in one run (issue 22).

Why: at 3M images a stage's per-image cost dominates, but every stage a user or a schedule runs also pays a fixed
start-up: the CLI submitting a Ray job, the job's driver importing and connecting, workers starting for the job, the
follower seeing the end. Issue 22's goal is <= 5 s on a warm cluster.

Where: the 3-node cluster of tests/multinode.py on 127.0.0.1 (token authentication on) with moto's S3 server as the
only storage (benchmarks/scale.py's `ClusterWithS3`), started once and kept warm; every stage is `python -m
dcgan.cli ...` with RAY_ADDRESS naming the Jobs API, as an operator runs it.

Rows (each run `--reps` times, in turn; median and all values printed):
  bare job     the floor every stage pays: `dcgan.jobs.run_job` (our submit and follower, in a fresh process) of a
               driver that connects and runs one task on a fresh worker: `python -c "import ray; ray.init();
               ray.get(ray.remote(lambda: 0).remote())"`.
  build-lsun   `dcgan build-lsun` of a 512-image LSUN-layout LMDB (one chunk, real photos; scale.py's generator).
  dedup        `dcgan dedup` of that dataset, default settings (its work on 512 images, 135 views each, is a few
               seconds of task time, so this row is its fixed cost plus that); the median of each phase's seconds
               (crops, train, encode, group, write: the dedup's report) is printed below the table.
  bare Ray Train job  (with train) the floor a training pays on top: a job whose driver runs a TorchTrainer of one
               1-CPU worker whose loop does nothing (`BARE_TRAIN`), with the project's controller poll
               (`preprocessing.ray_train.POLL_INTERVAL_S`): Ray Train's controller, its worker group and their
               processes' imports (torch among them), and its teardown.
  train        `dcgan train` for `--steps` steps (small networks, as scale.py), from that dataset (de-duplicated, with
               the dedup row).
  evaluate     `dcgan evaluate --suite samples` of that run.
The ratio is stage / bare job. build-lsun's work on 512 images is ~0.1 s of task time, so its row is its fixed cost.
`--first-chunk` runs only this, no cluster: a build's first chunk (`build.run_chunk`, 512 images) in a fresh process
pinned to one core, `--reps` times in turn with and without pandas imported first. A build job's chunk worker is
such a process; pyarrow's `pa.array` on Python objects imported pandas there until the shard columns were made from
their buffers (`shards.text_column`), so "with pandas" is the worker as it was.
`--poll-baseline` then runs `dcgan train` on a local Ray (the CLI's own), `--reps` times in turn with Ray Train's
default controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2, which the project leaves alone when set) and with the
project's (`preprocessing.ray_train.POLL_INTERVAL_S`), and prints the ratio.

Run: `.venv/bin/python benchmarks/startup.py` (about 4 minutes; `--stages build-lsun` for the first row only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402

BARE = "python -c 'import ray; ray.init(); ray.get(ray.remote(num_cpus=1)(lambda: 0).remote())'"
BARE_TRAIN = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={poll} python -c 'import ray; from ray.train import RunConfig, "
              "ScalingConfig; from ray.train.torch import TorchTrainer; ray.init(); TorchTrainer(lambda: None, "
              "scaling_config=ScalingConfig(num_workers=1, resources_per_worker={{\"CPU\": 1}}), "
              "run_config=RunConfig(storage_path=\"{storage}\")).fit()'")


def bare_argv(address: str, entrypoint: str = BARE) -> list[str]:
    follow = (f"from dcgan import jobs; jobs.run_job({address!r}, {entrypoint!r}, {{}}, lambda line: None)")
    return [sys.executable, "-c", follow]


def bare_train_argv(address: str, storage: Path) -> list[str]:
    """The bare Ray Train job; its run folder (nothing is written in it but Ray Train's own) in `storage`, which every
    node of this one-machine cluster sees."""
    from preprocessing.ray_train import POLL_INTERVAL_S

    return bare_argv(address, BARE_TRAIN.format(poll=f"{POLL_INTERVAL_S:g}", storage=storage))


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} exited {proc.returncode}; see {log}")
    return wall


POLL_ROWS = ("train, local, Ray's 2 s poll", "train, local, our poll")


def _poll_rows(work: Path, lmdb_path: str, reps: int, steps: int) -> dict[str, list[float]]:
    """`dcgan train` on a local Ray, in turn with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2 (Ray's default) and unset
    (the project's poll), on a dataset built here first (not timed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    ds = str(work / "local-ds")
    timed(scale.stage_argv("build-lsun", (ds, ds, ""), lmdb_path, steps), env, work / "poll.log")
    rows: dict[str, list[float]] = {name: [] for name in POLL_ROWS}
    for rep in range(reps):
        for i, (name, extra) in enumerate(zip(POLL_ROWS, ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}, {}))):
            run = str(work / f"local-run-{rep}-{i}")
            rows[name].append(timed(scale.stage_argv("train", (ds, ds, run), lmdb_path, steps), {**env, **extra},
                                    work / "poll.log"))
        print(f"[startup] local rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()),
              file=sys.stderr, flush=True)
    return rows


FIRST_CHUNK = """import sys, tempfile, time
t = time.perf_counter()
if {pandas}:
    import pandas  # noqa: F401  (the worker as it was)
from preprocessing import build
from preprocessing.config import BuildConfig
cfg = BuildConfig(kind="lsun", input={lmdb!r}, resolution=64)
out = tempfile.mkdtemp(dir={work!r})
build.run_chunk(build.plan(cfg).chunks[0], cfg, out + "/shards", out)
assert {pandas} or "pandas" not in sys.modules, "a build chunk imported pandas"
print(time.perf_counter() - t)
"""
FIRST_CHUNK_ROWS = ("first chunk, fresh process", "the same, pandas imported first")


def _first_chunk_rows(work: Path, lmdb_path: str, reps: int) -> dict[str, list[float]]:
    """Wall seconds of a fresh process's first build chunk, without and with pandas imported, in turn, on one core."""
    core = max(os.sched_getaffinity(0))
    rows: dict[str, list[float]] = {name: [] for name in FIRST_CHUNK_ROWS}
    for _ in range(reps):
        for name, pandas in zip(FIRST_CHUNK_ROWS, (False, True)):
            code = FIRST_CHUNK.format(pandas=pandas, lmdb=lmdb_path, work=str(work))
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {core}))
            rows[name].append(float(done.stdout.split()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=["build-lsun", "dedup", "train", "evaluate"],
                    choices=["build-lsun", "dedup", "train", "evaluate"])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--node-cpus", type=scale.positive_int, default=2,
                    help="the CPUs each worker node declares (scale.py's option)")
    ap.add_argument("--poll-baseline", action="store_true",
                    help="also train locally with Ray Train's default controller poll and with ours, in turn")
    ap.add_argument("--first-chunk", action="store_true",
                    help="only a build's first chunk in a fresh process, without and with pandas imported (no cluster)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup-", dir="/tmp"))
    try:
        _measure(args, work)
    finally:  # the LMDB, the runs' logs and datasets: this run's own
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path) -> None:
    lmdb_path = scale.ensure_lmdbs([512], work, seed=0)[512]
    if args.first_chunk:
        rows = _first_chunk_rows(work, lmdb_path, args.reps)
        base = statistics.median(rows[FIRST_CHUNK_ROWS[1]])
        print(f"\na build's first chunk (512 images) in a fresh process on one core, median of {args.reps}\n")
        print("| row | wall s, median | all runs | **vs with pandas** |")
        print("| --- | --- | --- | --- |")
        for name, vals in rows.items():
            med = statistics.median(vals)
            print(f"| {name} | {med:.3f} | {' / '.join(f'{v:.3f}' for v in vals)} | {base / med:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "first_chunk": rows}, indent=1))
        return
    bare_train = ["bare Ray Train job"] if "train" in args.stages else []
    rows: dict[str, list[float]] = {"bare job": [], **{s: [] for s in bare_train + args.stages}}
    phases: list[dict[str, float]] = []  # each dedup's phases, from its report: where its fixed cost goes
    with ExitStack() as stack:
        place = scale.ClusterWithS3(stack, args.node_cpus)
        address = place.cluster.jobs_address
        print("[startup] warming the cluster: one bare job, one build and, with train, one bare Ray Train job (not "
              "counted)", file=sys.stderr, flush=True)
        with place.stage() as (env, _, _):
            timed(bare_argv(address), env, work / "warm.log")
            if bare_train:  # its first fit starts Ray's detached autoscaling coordinator, which every later fit reuses
                timed(bare_train_argv(address, work / "bare-train"), env, work / "warm.log")
            timed(scale.stage_argv("build-lsun", place.uris(work / "warm"), lmdb_path, args.steps), env,
                  work / "warm.log")
            for rep in range(args.reps):
                ds, dd, run = place.uris(work / f"rep{rep}")
                if "build-lsun" not in args.stages:  # the warm-up's build is the dataset
                    ds = place.uris(work / "warm")[0]
                uris = (ds, dd if "dedup" in args.stages else ds, run)  # without dedup, training reads the build's
                rows["bare job"].append(timed(bare_argv(address), env, work / "bare.log"))
                for name in bare_train:
                    rows[name].append(timed(bare_train_argv(address, work / "bare-train"), env,
                                            work / "bare-train.log"))
                for stage in args.stages:
                    rows[stage].append(timed(scale.stage_argv(stage, uris, lmdb_path, args.steps), env,
                                             work / f"{stage}.log"))
                    if stage == "dedup":
                        phases.append(scale.dedup_phases(dd))
                print(f"[startup] rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()),
                      file=sys.stderr, flush=True)
    if args.poll_baseline:
        rows.update(_poll_rows(work, lmdb_path, args.reps, args.steps))
    base = statistics.median(rows["bare job"])
    print(f"\nwarm 3-node cluster + S3 (127.0.0.1), {os.cpu_count()} cores, median of {args.reps} "
          f"(train: {args.steps} steps)\n")
    print("| row | wall s, median | all runs | **vs bare job** |")
    print("| --- | --- | --- | --- |")
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.2f} | {' / '.join(f'{v:.2f}' for v in vals)} | {med / base:.2f}x |")
    if phases:
        split = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        print(f"\ndedup's phases, median s: {', '.join(f'{k[:-2]} {v:.2f}' for k, v in split.items())} (sum "
              f"{sum(split.values()):.2f} of the row's {statistics.median(rows['dedup']):.2f}; the rest is the "
              "job's start, its checks and its report)")
    if bare_train:
        train, floor = statistics.median(rows["train"]), statistics.median(rows[bare_train[0]])
        print(f"\ntrain / bare Ray Train job: {train / floor:.2f}x ({train - floor:.2f} s above Ray Train's own "
              f"start and teardown, {floor:.2f} s)")
    if "build-lsun" in rows:
        med = statistics.median(rows["build-lsun"])
        print(f"\nbuild-lsun's fixed cost {med:.2f} s: goal <= 5 s on a warm cluster: "
              f"{'met' if med <= 5 else 'NOT met'}")
    if args.poll_baseline:
        ratio = statistics.median(rows[POLL_ROWS[0]]) / statistics.median(rows[POLL_ROWS[1]])
        print(f"\nlocal train, Ray's default poll / ours: {ratio:.2f}x the wall time (median of {args.reps})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "node_cpus": args.node_cpus, "reps": rows,
                                               "dedup_phases_s": phases}, indent=1))


if __name__ == "__main__":
    main()
