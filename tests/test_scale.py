"""benchmarks/scale.py's pieces that its figures rest on: the planted duplicates, the recall count, the process-tree
memory sampling and the fitted laws (the full pipeline run is the benchmark itself, too slow for tests)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale  # noqa: E402


def _decode(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_lmdb_has_lsun_layout_and_planted_duplicates(tmp_path):
    import lmdb

    path = str(tmp_path / "lsun")
    truth = scale.make_lmdb(path, 100, exact=0.05, near=0.05, seed=3, batch=7)
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        entries = {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    assert len(entries) == 100
    assert all(len(k) == 40 and int(k, 16) >= 0 for k in entries)
    assert all(v[:3] == b"\xff\xd8\xff" or (v[:4] == b"RIFF" and v[8:12] == b"WEBP") for v in entries.values())
    assert all(min(_decode(v).shape[:2]) == 256 for v in list(entries.values())[:20])
    kinds = [p[0] for p in truth["pairs"]]
    assert kinds.count("exact") == 5 and kinds.count("near") == 5
    for kind, a, b in truth["pairs"]:
        if kind == "exact":
            assert entries[a] == entries[b] and a != b
        else:  # a near duplicate differs in bytes but is close in pixels, closer than an unrelated entry
            assert entries[a] != entries[b]
            x, y = _decode(entries[a]), _decode(entries[b])
            h, w = min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1])
            import cv2

            small = [cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA).astype(float) for im in (x, y)]
            near_err = np.abs(small[0] - small[1]).mean()
            other = next(k for k in entries if k not in (a, b))
            far = cv2.resize(_decode(entries[other]), (32, 32), interpolation=cv2.INTER_AREA).astype(float)
            assert near_err < 20 and near_err < np.abs(small[0] - far).mean(), (near_err, h, w)
    # deterministic for a seed
    again = scale.make_lmdb(str(tmp_path / "again"), 100, exact=0.05, near=0.05, seed=3)
    assert again == truth


def test_dedup_recall_counts_pairs_and_other_removals():
    pairs = [["exact", "a", "b"], ["exact", "c", "d"], ["near", "e", "f"]]
    kept = {"a", "c", "d", "e", "g"}  # b removed (found), c/d both kept (missed), f removed (found), h removed
    r = scale.dedup_recall(pairs, kept, n_inputs=8, n_kept=5)
    assert r["recall_exact"] == 0.5 and r["recall_near"] == 1.0
    assert r["removed"] == 3 and r["other_removed"] == 1


def test_dedup_overrides_reach_the_dedup_commands_config():
    """`--dedup-set` (how the 300k runs compared `dedup.train_images` 200k with the 50k default): the dedup stage's
    command line resolves to a config with those values, and the default where none is given."""
    from dcgan.cli import build_parser
    from dcgan.commands import config_of

    def dedup_config(*sets):
        argv = scale.stage_argv("dedup", ("ds", "dd", "run"), "lmdb", 5, sets)
        return config_of(build_parser().parse_args(argv[3:])).dedup

    cfg = dedup_config("dedup.train_images=200000", "dedup.seed=1")
    assert (cfg.train_images, cfg.seed) == (200_000, 1)
    assert dedup_config().train_images == 50_000


def test_monitor_sees_a_childs_peak_memory(tmp_path):
    """A child that allocates 300 MiB and frees it: the driver's VmHWM and the tree's private memory show it."""
    code = ("import time, subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(300 << 20); time.sleep(1.5)'])\n"
            "c.wait(); b = bytearray(120 << 20); time.sleep(0.5)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    with scale.Monitor(proc.pid, interval=0.1) as mon:
        proc.wait()
    assert mon.peaks.driver_rss >= 120 << 20
    assert mon.peaks.tree_anon >= 300 << 20
    assert len(mon.peaks.pids) >= 2


def test_fitted_laws():
    ns = [10_000, 20_000, 40_000]
    fixed, per = scale.fit_linear(ns, [5 + 1e-3 * n for n in ns])
    assert fixed == pytest.approx(5) and per == pytest.approx(1e-3)
    assert scale.linearity(ns, [5 + 1e-3 * n for n in ns]) == pytest.approx(1.0)
    quadratic = [1e-8 * n * n for n in ns]
    assert scale.linearity(ns, quadratic) == pytest.approx(2.0)  # marginal cost doubles: not linear
    assert scale.linearity(ns[:2], [1, 2]) is None
    assert scale.projection(10, 1e-3, cores_here=2, n=3_000_000, cores=64) == pytest.approx(10 + 93.75)


def test_monitor_on_a_cluster_counts_each_node_and_only_the_cpu_spent_while_it_ran():
    """--where cluster: the nodes' processes are older than the stage, so only the CPU they spend while it runs
    counts, and each node's peak private memory is kept apart."""

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", burn + "b = bytearray(200 << 20)\nprint('ready', flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert busy.stdout.readline().strip() == "ready"  # `busy` spent its CPU second before the stage starts
        stage = subprocess.Popen([sys.executable, "-c", burn])
        with scale.Monitor(stage.pid, interval=0.1, nodes=lambda: {"a": [busy.pid], "b": [idle.pid]}) as mon:
            stage.wait()
    finally:
        busy.kill(), idle.kill(), busy.wait(), idle.wait()
    assert mon.peaks.nodes["a"]["anon"] >= 200 << 20 > mon.peaks.nodes["b"]["anon"]
    assert 0.9 <= mon.cpu_s < 1.6, mon.cpu_s  # the stage's second, not the node's earlier one too


def test_the_cpu_is_told_apart_by_what_spent_it():
    """The CPU breakdown (`cpu_by_kind`): the stage's driver, a Ray worker (its process title `ray::...`), Ray's own
    processes (the dashboard agent, also titled `ray::...`) and others (a Python whose folders are named "agent" and
    "dashboard"), each counted where it belongs by the name it has last, adding up to what the kernel counted."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\ntime.sleep(0.5)\n"
    children = [("ray::IDLE", 0.8), ("ray::DashboardAgent", 0.5), ("/srv/agent/dashboard/bin/python3", 0.4)]
    # each child is a bash that execs Python under another name (the pid keeps its first name until then); PYTHONHOME,
    # because a Python started under another name cannot find its prefix from it
    stage_code = ("import os, subprocess, sys, time\n"
                  "env = dict(os.environ, PYTHONHOME=sys.base_prefix)\n"
                  "kids = [subprocess.Popen(['bash', '-c', 'exec -a \"' + name + '\" ' + sys.executable + ' -c \"$0\"', "
                  f"{burn!r}.format(secs)], env=env) for name, secs in {children!r}]\n"
                  + burn.format(0.3) + "for k in kids: k.wait()\n")  # each sleeps after its burn: sampled alive
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stage = subprocess.Popen([sys.executable, "-c", stage_code])
    with scale.Monitor(stage.pid, interval=0.05) as mon:
        stage.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and the children it waited for
    kinds = mon.peaks.kinds
    assert sorted(kinds.values()) == ["driver", "other", "ray system", "ray worker"], kinds
    by = mon.cpu_by_kind
    assert 0.25 <= by["driver"] < 0.6 and 0.7 <= by["ray worker"] < 1.1, by
    assert 0.4 <= by["ray system"] < 0.8 and 0.35 <= by["other"] < 0.7, by
    kernel = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert abs(sum(by.values()) - kernel) < 0.25, (by, kernel)


def test_a_workers_cpu_is_put_under_the_task_it_ran():
    """`cpu_top` puts a Ray worker's CPU under the task it ran when it was spent (its process title at each sample),
    not all of it under the last one: a worker that ran task A for 0.4 s, then task B for 0.6 s, then went idle shows
    A and B with their own CPU. A worker that became one of Ray's own actors (as Ray's job supervisor starts) counts
    as that, its whole life, and not also as a worker: the workers' rows add up to the workers' `cpu_by_kind`."""
    code = ("import sys, time\n"
            "from ray._raylet import setproctitle\n"  # Ray's own: what a worker titles itself with
            "def burn(s):\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < s: pass\n"
            "time.sleep(0.3)\n"  # each step between sleeps that the sampler sees: none straddles a title
            "for title, secs in zip(sys.argv[1::2], map(float, sys.argv[2::2])):\n"
            "    setproctitle(title)\n"
            "    time.sleep(0.3)\n"
            "    burn(secs)\n"
            "    time.sleep(0.3)\n")
    # a worker titled by Ray; then a worker process (Ray's worker script on its command line) that becomes Ray's job
    # supervisor; both in turn
    stage_code = ("import os, subprocess, sys\n"
                  f"code = {code!r}\n"
                  "subprocess.run([sys.executable, '-c', code, 'ray::A()', '0.4', 'ray::B()', '0.6', 'ray::IDLE', '0', "
                  "'ray::Z()', '0'], check=True)\n"  # Z: the interpreter's exit is not B's
                  "subprocess.run([sys.executable, '-c', code, '/x/ray/_private/workers/default_worker.py', '0.3', "
                  "'ray::JobSupervisor', '0.2'], check=True)\n")
    stage = subprocess.Popen([sys.executable, "-c", stage_code])
    with scale.Monitor(stage.pid, interval=0.05) as mon:
        stage.wait()
    assert stage.returncode == 0
    tasks = {t["title"]: t["cpu_s"] for t in mon.cpu_top() if t["kind"] == "ray worker"}
    assert 0.35 <= tasks["ray::A()"] < 0.5 and 0.55 <= tasks["ray::B()"] < 0.7, tasks
    assert abs(sum(tasks.values()) - mon.cpu_by_kind["ray worker"]) < 0.02, (tasks, mon.cpu_by_kind)
    assert mon.cpu_by_kind["ray system"] >= 0.5, mon.cpu_by_kind  # the supervisor's 0.3 s as a worker, and its 0.2


def test_the_memory_warm_up_touches_what_it_says_and_leaves_the_rest():
    """benchmarks/box_memory.py, which `scale.py --warm-memory` runs first: a pass over 1 GiB shows in the process's
    page faults (one per 4 KiB page at least, or per huge page), and a pass that must leave more than is available
    touches nothing."""
    import resource

    import box_memory

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one = box_memory.touch(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert one["gib"] == 1 and one["s"] > 0 and faults >= (1 << 30) // (2 << 20)
    none = box_memory.warm(leave=box_memory.available_gib() + 1)
    assert none["gib"] == 0 and none["available_gib"] > 0
