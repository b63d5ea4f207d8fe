"""Bad input and faults, as a new user meets them, through the `dcgan` CLI: each case must end with exit status 2
and one line on stderr that names the culprit, no traceback, and no change to any file outside the command's output
(the files around it stand for a user's own work: a thesis beside a dataset, a bucket with other data in it).

Each case builds its own small world (a committed dataset of real digits, a run with two checkpoints, a user's
folder) in a fresh temporary directory; the command runs in-process through `dcgan.cli.main` with stderr captured
at the file-descriptor level. The slow cases start Ray (a build that gets as far as reading its inputs).
One long module on purpose: it is the fault matrix, one table of cases a reader can scan against the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from prefect_fixtures import prefect_harness  # noqa: F401  (fixture)
import realdata
from realdata import grace_hopper_path, mnist_rgb32

from dcgan import checkpoints
from dcgan.cli import main
from dcgan.config import dump_config, load_config
from dcgan.networks import Discriminator, Generator
from preprocessing import lsun, shards, storage
from preprocessing import dataset_layout
from dcgan import run_layout

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-test.yaml")
THESIS = b"chapter 1: everything I know\n"


# ------------------------------------------------------------------------------------------------ the world


@dataclass
class World:
    root: Path
    dataset: str          # a committed dataset of 64 real digits at 32 px (2 shards)
    run: str              # a run of configs/tiny-test.yaml with checkpoints at steps 5 and 10
    user: Path            # somebody's folder: a thesis, and a shards/ folder of their own
    bucket: str | None = None

    def p(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))


def make_dataset(uri: str, n: int = 64) -> None:
    images = mnist_rgb32(n)
    half = n // 2
    entries = [shards.write_table(uri, dataset_layout.part(i), shards.make_table(
        [f"d{j:05d}" for j in range(i * half, (i + 1) * half)], images[i * half:(i + 1) * half])) for i in range(2)]
    shards.write_manifest(uri, kind="lsun", resolution=32, shards=entries, inputs=n)


def make_run(uri: str) -> None:
    cfg = load_config(TINY, {"run": uri})
    storage.write_text(storage.join(uri, "config.yaml"), dump_config(cfg))
    storage.write_json(storage.join(uri, "_dcgan.json"), {"kind": "run"})
    g, d = Generator(cfg.model), Discriminator(cfg.model)
    for step in (5, 10):
        checkpoints.save(uri, step, {"generator": g.state_dict(), "discriminator": d.state_dict(), "step": step,
                                     "config": cfg.model_dump(mode="json")})


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    import logging

    # Ray Data's own INFO lines go to a console handler bound to the stderr of the test that first started it
    for name in ("ray", "ray.data"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.WARNING)
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "thesis"
    (user / "shards").mkdir(parents=True)
    (user / "thesis.tex").write_bytes(THESIS)
    (user / "shards" / "part-00000.parquet").write_bytes(b"my own shard, not yours")
    w = World(tmp_path, str(tmp_path / "data" / "digits"), str(tmp_path / "runs" / "tiny"), user)
    make_dataset(w.dataset)
    make_run(w.run)
    return w


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    culprit: Callable[[World], str] | str   # text the one line must contain
    output: Callable[[World], str] | None = None  # the one location the command may change
    setup: Callable[[World], None] | None = None
    ray: bool = False
    subprocess: bool = False  # a fault that could kill the process (a bus error) runs in its own


def write(path: str, data: bytes | str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def edit_manifest(w: World, fn) -> None:
    uri = storage.join(w.dataset, "manifest.json")
    storage.write_text(uri, json.dumps(fn(json.loads(storage.read_text(uri)))))


def bad_lmdb(w: World, kind: str) -> str:
    path = w.p("lsun", f"{kind}_lmdb")
    Path(path).mkdir(parents=True)
    if kind == "random":
        write(f"{path}/data.mdb", bytes(range(256)) * 64)
    else:
        data = grace_hopper_path().read_bytes()
        lsun.write_lmdb(path, {f"{i:040x}".encode(): data for i in range(40)})
        mdb = Path(path) / "data.mdb"
        mdb.write_bytes(mdb.read_bytes()[: mdb.stat().st_size // 3])
    return path


def digits_folder(w: World, n: int = 8) -> str:
    return str(realdata.digits_folder(Path(w.p("digits-in")), n))


def truncate_newest(w: World) -> None:
    state = Path(run_layout.checkpoint(w.run, 10)) / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])


def change_stored_model(w: World) -> None:
    p = Path(w.run) / "config.yaml"
    p.write_text(p.read_text().replace("ngf: 16", "ngf: 8"))


def foreign_bucket(w: World) -> None:
    storage.write_bytes(f"{w.bucket}/family/photo.jpg", grace_hopper_path().read_bytes())


def out_dir(name):
    return lambda w: w.p(name)


CASES = [
    # ---- build-lsun
    Case("lsun-missing-input", lambda w: ["build-lsun", w.p("nowhere"), "--out", w.p("o")], "nowhere"),
    Case("lsun-no-input-at-all", lambda w: ["build-lsun", "--out", w.p("o")], "build.input: no input given"),
    Case("lsun-input-is-a-file", lambda w: ["build-lsun", write(w.p("x.bin"), b"1"), "--out", w.p("o")], "x.bin"),
    Case("lsun-empty-folder", lambda w: ["build-lsun", str(Path(w.p("empty")).mkdir() or w.p("empty")), "--out",
                                         w.p("o")], "empty"),
    Case("lsun-lmdb-random-bytes", lambda w: ["build-lsun", bad_lmdb(w, "random"), "--out", w.p("o")],
         "random_lmdb"),
    Case("lsun-lmdb-truncated", lambda w: ["build-lsun", bad_lmdb(w, "cut"), "--out", w.p("o")], "cut_lmdb",
         subprocess=True),
    # (8 digits are too few to de-duplicate, told first: the output's cases pass --no-dedup; all are told before
    # Ray starts)
    Case("lsun-out-is-a-file", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out",
                                          write(w.p("f.txt"), b"x")], "f.txt"),
    Case("lsun-out-holds-user-files", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out", str(w.user)],
         "thesis"),
    Case("lsun-out-is-a-dataset", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out", w.dataset],
         "--overwrite"),
    Case("lsun-out-below-a-file", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out",
                                             write(w.p("notes.txt"), b"mine") + "/sub"], "notes.txt is a file"),
    Case("lsun-out-inside-the-input", lambda w: ["build-lsun", digits_folder(w), "--out", w.p("digits-in", "out")],
         "overlaps the input"),
    Case("lsun-bad-resolution", lambda w: ["build-lsun", w.p("nowhere"), "--out", w.p("o"), "--resolution", "48"],
         "resolution"),
    Case("lsun-config-malformed", lambda w: ["build-lsun", w.p("x"), "--config", write(w.p("c.yaml"), "model: [1\n")],
         "c.yaml"),
    Case("lsun-config-is-a-folder", lambda w: ["build-lsun", w.p("x"), "--config", str(w.user)], "thesis"),
    Case("lsun-config-missing", lambda w: ["build-lsun", w.p("x"), "--config", w.p("none.yaml")], "none.yaml"),
    Case("lsun-config-unknown-key", lambda w: ["build-lsun", w.p("x"), "--config",
                                              write(w.p("c.yaml"), "modle: {}\n")], "modle"),
    Case("lsun-config-not-a-mapping", lambda w: ["build-lsun", w.p("x"), "--config", write(w.p("c.yaml"), "- 1\n")],
         "c.yaml"),
    Case("lsun-nothing-usable", lambda w: ["build-lsun", str(Path(write(w.p("junk", "a.png"), b"not a png")).parent),
                                           "--out", w.p("o"), "--no-dedup"], "junk", out_dir("o"), ray=True),
    Case("lsun-missing-bucket", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out",
                                           "s3://no-such-bucket-x/d"], "no-such-bucket-x"),
    Case("lsun-bucket-with-other-data", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out", w.bucket],
         "family/photo.jpg", setup=foreign_bucket),
    Case("lsun-out-s3-names-no-bucket", lambda w: ["build-lsun", digits_folder(w), "--out", "s3://"],
         "s3:// names no bucket"),  # "s3://" without its slashes was the local folder "s3:", and a build went there
    Case("lsun-out-name-too-long", lambda w: ["build-lsun", digits_folder(w), "--no-dedup", "--out", w.p("d" * 300)],
         "File name too long"),
    Case("lsun-too-few-to-deduplicate", lambda w: ["build-lsun", digits_folder(w), "--out", w.p("o"), "--resolution",
                                                   "32"], "8 inputs are too few to train the hashing autoencoder"),
    Case("lsun-input-is-an-lmdbs-file", lambda w: ["build-lsun", write(w.p("bedroom_lmdb", "data.mdb"), b"x"),
                                                   "--out", w.p("o")], "a file of an LMDB: give its folder"),
    # ---- build-faces
    Case("faces-missing-cascade", lambda w: ["build-faces", digits_folder(w), "--out", w.p("o"), "--cascade",
                                             "haarcascade_nothing.xml"], "haarcascade_nothing.xml", out_dir("o"),
         ray=True),
    Case("faces-url-list-without-url-column", lambda w: ["build-faces", write(w.p("u.csv"), "name,link\na,b\n"),
                                                         "--out", w.p("o")], "u.csv", out_dir("o")),
    Case("faces-local-paths-in-url-list", lambda w: ["build-faces", write(w.p("u.txt"), "file:///etc/passwd\n"
                                                     f"{grace_hopper_path()}\n"), "--out", w.p("o"), "--no-dedup"],
         "u.txt", out_dir("o"), ray=True),
    Case("faces-bad-min-face", lambda w: ["build-faces", w.p("x"), "--out", w.p("o"), "--min-face", "0"], "min_face"),
    Case("faces-bad-margin", lambda w: ["build-faces", w.p("x"), "--out", w.p("o"), "--margin", "3"], "margin"),
    # ---- dedup
    Case("dedup-missing-source", lambda w: ["dedup", w.p("nowhere")], "nowhere"),
    Case("dedup-source-not-a-dataset", lambda w: ["dedup", str(w.user)], "thesis"),
    Case("dedup-out-is-source", lambda w: ["dedup", w.dataset, "--out", w.dataset], "overlaps"),
    Case("dedup-out-is-source-parent", lambda w: ["dedup", w.dataset, "--out", str(Path(w.dataset).parent)],
         "overlaps"),
    Case("dedup-out-inside-source", lambda w: ["dedup", w.dataset, "--out", w.dataset + "/v2"], "overlaps"),
    Case("dedup-out-holds-user-files", lambda w: ["dedup", w.dataset, "--out", str(w.user)], "thesis"),
    Case("dedup-out-bucket-with-other-data", lambda w: ["dedup", w.dataset, "--out", w.bucket], "family/photo.jpg",
         setup=foreign_bucket),
    Case("dedup-manifest-is-a-list", lambda w: ["dedup", w.dataset, "--out", w.p("o")], "manifest.json",
         setup=lambda w: edit_manifest(w, lambda m: [m])),
    Case("dedup-manifest-wrong-types", lambda w: ["dedup", w.dataset, "--out", w.p("o")], "resolution",
         setup=lambda w: edit_manifest(w, lambda m: {**m, "resolution": "32"})),
    Case("dedup-manifest-bad-shard-entry", lambda w: ["dedup", w.dataset, "--out", w.p("o")], "shards[1].rows",
         setup=lambda w: edit_manifest(w, lambda m: {**m, "shards": [m["shards"][0], {**m["shards"][1], "rows": "x"}]})),
    Case("dedup-shard-missing", lambda w: ["dedup", w.dataset, "--out", w.p("o")], "part-00001",
         setup=lambda w: Path(w.dataset, "shards", "part-00001.parquet").unlink()),
    Case("dedup-shard-replaced", lambda w: ["dedup", w.dataset, "--out", w.p("o")], "part-00001",
         setup=lambda w: shutil.copy(Path(w.dataset, "shards", "part-00000.parquet"),
                                     Path(w.dataset, "shards", "part-00001.parquet"))),
    Case("dedup-config-malformed", lambda w: ["dedup", w.dataset, "--config", write(w.p("c.yaml"), "dedup: {x\n")],
         "c.yaml"),
    # ---- train
    Case("train-missing-data", lambda w: ["train", "--config", TINY, "--data", w.p("nowhere"), "--run", w.p("r")],
         "nowhere"),
    Case("train-resolution-mismatch", lambda w: ["train", "--data", w.dataset, "--run", w.p("r")], "resolution"),
    Case("train-batch-larger-than-data", lambda w: ["train", "--config", write(w.p("c.yaml"), Path(TINY).read_text()
                                                    .replace("batch_size: 32", "batch_size: 128")
                                                    .replace("workers: 2", "workers: 1")),
                                                    "--data", w.dataset, "--run", w.p("r")], "batch_size"),
    Case("train-run-holds-user-files", lambda w: ["train", "--config", TINY, "--data", w.dataset, "--run",
                                                  str(w.user)], "thesis"),
    Case("train-resume-with-another-model", lambda w: ["train", "--config", TINY, "--data", w.dataset, "--run", w.run],
         "model.ngf", setup=change_stored_model),
    Case("train-bad-override", lambda w: ["train", "--config", TINY, "--steps", "0", "--data", w.dataset], "steps"),
    Case("train-more-workers-than-the-cluster", lambda w: ["train", "--config", TINY, "--data", w.dataset, "--run",
                                                           w.p("r"), "--workers", "8"], "cluster.workers=8", ray=True),
    Case("train-gpus-the-cluster-lacks", lambda w: ["train", "--config", TINY, "--data", w.dataset, "--run", w.p("r"),
                                                    "--gpu"], "GPU", ray=True),
    Case("train-run-below-a-file", lambda w: ["train", "--config", TINY, "--data", w.dataset, "--run",
                                              write(w.p("notes.txt"), b"mine") + "/sub"], "notes.txt is a file",
         ray=True),
    Case("train-set-value-not-yaml", lambda w: ["train", "--config", TINY, "--set", "train.steps=[1"],
         "train.steps=[1"),
    Case("train-set-value-empty", lambda w: ["train", "--config", TINY, "--set", "train.steps="], "train.steps="),
    Case("train-flag-and-set-of-one-field", lambda w: ["train", "--config", TINY, "--steps", "5", "--set",
                                                       "train.steps=7"], "--steps 5 and --set train.steps=7"),
    Case("train-workers-do-not-divide-batch", lambda w: ["train", "--config", TINY, "--workers", "3"], "workers"),
    # ---- sample
    Case("sample-missing-run", lambda w: ["sample", "--run", w.p("nowhere")], "nowhere"),
    Case("sample-run-without-checkpoints", lambda w: ["sample", "--run", str(w.user)], "thesis"),
    Case("sample-missing-step", lambda w: ["sample", "--run", w.run, "--step", "7"], "step 7"),
    Case("sample-zero-samples", lambda w: ["sample", "--run", w.run, "--n", "0"], "--n"),
    Case("sample-out-exists", lambda w: ["sample", "--run", w.run, "--out", str(w.user / "thesis.tex")], "thesis.tex"),
    Case("sample-every-checkpoint-corrupt", lambda w: ["sample", "--run", w.run], "corrupt",
         setup=lambda w: [Path(run_layout.checkpoint(w.run, s), "COMPLETE").write_text("") for s in (5, 10)]),
    Case("sample-chosen-step-corrupt", lambda w: ["sample", "--run", w.run, "--step", "10"], "step-0000010",
         setup=truncate_newest),
    # ---- evaluate
    Case("evaluate-missing-run", lambda w: ["evaluate", "--run", w.p("nowhere")], "nowhere"),
    Case("evaluate-unknown-suite", lambda w: ["evaluate", "--run", w.run, "--suite", "samples,fidd"], "fidd"),
    Case("evaluate-missing-cifar", lambda w: ["evaluate", "--run", w.run, "--suite", "cifar10", "--cifar10",
                                              w.p("cifar.tar.gz")], "cifar.tar.gz"),
    Case("evaluate-bad-arithmetic", lambda w: ["evaluate", "--run", w.run, "--suite", "arithmetic", "--arithmetic",
                                               "1,2 -"], "arithmetic"),
    Case("evaluate-boxes-not-json", lambda w: ["evaluate", "--run", w.run, "--suite", "forgetting", "--boxes",
                                               write(w.p("boxes.json"), "{x")], "boxes.json"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.ray else [])
                                  for c in CASES])
def test_known_fault_is_one_line_and_touches_nothing_else(case: Case, world: World, capfd, request):
    if any(s in case.name for s in ("bucket",)):
        world.bucket = request.getfixturevalue("s3_bucket")
    if case.ray:
        request.getfixturevalue("ray_cluster")
    if case.setup:
        case.setup(world)
    argv = case.argv(world)
    before = snapshot(world.root)
    bucket_before = storage.list_uris(world.bucket) if world.bucket else None
    capfd.readouterr()

    if case.subprocess:
        done = subprocess.run([sys.executable, "-m", "dcgan.cli", *argv], cwd=world.root, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        status, err = done.returncode, done.stderr
    else:
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
        err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"dcgan {argv[0]}: error: ")]
    culprit = case.culprit(world) if callable(case.culprit) else case.culprit
    assert status == 2, f"exit {status}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    output = Path(case.output(world)) if case.output else None
    after = snapshot(world.root)
    outside = {k for k in before.keys() | after.keys()
               if before.get(k) != after.get(k) and not (output and (world.root / k).is_relative_to(output))}
    assert not outside, f"changed outside the output: {sorted(outside)}"
    if world.bucket:
        assert storage.list_uris(world.bucket) == bucket_before


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------ what still works


def test_overwrite_removes_only_the_projects_own_files(tmp_path, s3_bucket):
    """A rebuild over a dataset keeps a user's notes dropped inside it, locally and on S3."""
    from preprocessing import ownership

    for root in (str(tmp_path / "ds"), f"{s3_bucket}/datasets/ds"):
        make_dataset(root)
        ownership.claim(root, "dataset", legacy=lambda uri: True)
        storage.write_bytes(storage.join(root, "NOTES.md"), THESIS)
        storage.write_bytes(storage.join(root, "shards", "notes.txt"), THESIS)
        removed = ownership.remove_own(root, "dataset")
        left = sorted(u[len(root) + 1:] for u in storage.list_uris(root)) if storage.is_s3(root) else \
            sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())
        assert removed == 3  # manifest and two shards
        assert left == ["NOTES.md", "_dcgan.json", "shards/notes.txt"]
        assert storage.read_bytes(storage.join(root, "NOTES.md")) == THESIS


@pytest.mark.slow  # ~10 s writing 1,001 objects; the fast loop keeps test_overwrite_removes_only_the_projects_own_files
def test_a_builds_chunk_records_on_s3_go_in_a_few_requests_not_three_each(s3_server, s3_bucket, monkeypatch):
    """At the end of every build `remove_own` removes its chunk records, one a chunk: each went with a listing, a
    HEAD and a delete (~4,400 requests in a row at the end of a 3M-image build, issue 22). The listing that found
    them is enough: DeleteObjects removes 1,000 at a time; another file in the folder stays."""
    from preprocessing import ownership
    from s3_faults import FaultProxy

    root = f"{s3_bucket}/datasets/ds"
    make_dataset(root)
    ownership.claim(root, "dataset", legacy=lambda uri: True)
    chunks = 1001  # two DeleteObjects
    for i in range(chunks):
        storage.write_bytes(dataset_layout.chunk_state(root, i), b"{}")
    storage.write_bytes(storage.join(root, dataset_layout.CHUNKS, "notes.txt"), THESIS)
    with FaultProxy(s3_server, rate=0.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        removed = ownership.remove_own(root, "dataset", under=dataset_layout.CHUNKS)
        requests = proxy.requests
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert removed == chunks
    assert requests <= 8, requests  # the marker, the listing's pages, two DeleteObjects (3,000+ one by one)
    left = sorted(u[len(root) + 1:] for u in storage.list_uris(root))
    assert left == ["_chunks/notes.txt", "_dcgan.json", "manifest.json", dataset_layout.part(0),
                    dataset_layout.part(1)]


def test_sample_falls_back_past_a_truncated_newest_checkpoint(world, capfd):
    truncate_newest(world)
    capfd.readouterr()
    assert main(["sample", "--run", world.run, "--n", "4"]) == 0
    out, err = capfd.readouterr()
    assert "step 5" in out and "Traceback" not in err
    warnings = [ln for ln in err.splitlines() if "corrupt checkpoint" in ln]
    assert len(warnings) == 1 and "step-0000010" in warnings[0]
    assert (Path(run_layout.checkpoint(world.run, 10)) / "state.pt").exists()  # left in place, not deleted


def test_evaluate_tells_of_a_truncated_newest_checkpoint_once(world, capfd):
    """An evaluation asks where the run stands, then loads its models: it told of the same corrupt checkpoint twice."""
    truncate_newest(world)
    capfd.readouterr()
    assert main(["evaluate", "--run", world.run, "--suite", "samples"]) == 0
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "corrupt checkpoint" in ln]
    assert len(warnings) == 1 and "step-0000010" in warnings[0] and "Traceback" not in err, err


@pytest.mark.slow
def test_relative_run_trains_and_resumes_past_a_corrupt_checkpoint(world, ray_cluster, capfd):
    """`--run runs/x` (relative, as the shipped configs' `root: ./runs`) trains; a cut-off newest checkpoint is
    reported and skipped, and the run resumes from the one before it."""
    from dcgan.run_log import read_metrics

    args = ["train", "--config", TINY, "--data", "data/digits", "--run", "runs/rel", "--steps"]
    assert main([*args, "2"]) == 0
    run = str(world.root / "runs" / "rel")
    assert checkpoints.complete_steps(run) == [2]
    state = Path(run_layout.checkpoint(run, 2)) / "state.pt"
    checkpoints.save(run, 3, checkpoints.load_state(run, 2) | {"step": 3})
    (Path(run_layout.checkpoint(run, 3)) / "state.pt").write_bytes(state.read_bytes()[:5000])
    capfd.readouterr()
    assert main([*args, "4"]) == 0
    assert "skipping a corrupt checkpoint" in capfd.readouterr().err
    assert checkpoints.load_state(run)["step"] == 4
    steps = [int(r["step"]) for r in read_metrics(run)]
    assert steps[-1] == 4 and 3 not in steps[steps.index(2) + 1:]  # continued from 2, not from the corrupt 3


@pytest.mark.slow
def test_a_resume_from_before_its_cut_off_checkpoints_keeps_the_ones_it_writes_again(world, ray_cluster, capfd):
    """Every checkpoint of a run cut off (state.pt emptied): the rerun starts at step 0 and writes the same steps'
    folders again. Ray Train remembered the old ones and, past keep_checkpoints, removed the new folders in their
    place: the run ended with no checkpoint at all, exit 0, its summary naming a step-0 checkpoint that was never
    written."""
    args = ["train", "--config", TINY, "--data", "data/digits", "--run", "runs/cut", "--steps", "4",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=2"]
    assert main(args) == 0
    run = str(world.root / "runs" / "cut")
    assert checkpoints.valid_steps(run) == [2, 4]
    for step in (2, 4):
        (Path(run_layout.checkpoint(run, step)) / "state.pt").write_bytes(b"")
    capfd.readouterr()
    assert main(args) == 0
    out, err = capfd.readouterr()
    assert "no checkpoint was written whole" in err and "starting at step 0" in err
    assert checkpoints.valid_steps(run) == [2, 4] and checkpoints.load_state(run)["step"] == 4
    assert f"run {run} at step 4: checkpoint {run_layout.checkpoint(run, 4)}" in out, out


@pytest.mark.slow
def test_flows_fail_once_with_the_same_line_and_touch_nothing(world, ray_cluster, prefect_harness):
    """A deployment run meets the same known faults: the run fails at the first attempt (a bad input is not
    retried), its message names the culprit, and the user's files are untouched."""
    from prefect_fixtures import run_logs

    from pipelines.flows import build_lsun, train_dcgan
    from preprocessing.config import BuildConfig, DedupConfig

    before = snapshot(world.root)
    state = build_lsun(build=BuildConfig(input=digits_folder(world), resolution=32), out=str(world.user),
                       dedup=DedupConfig(enabled=False), return_state=True)
    assert state.is_failed() and "thesis" in state.message
    logs = run_logs(state.state_details.flow_run_id)
    assert logs.count("build-lsun runs on a local Ray") == 1 and "Retry" not in logs

    cfg = load_config(TINY, {"data": world.dataset, "run": str(world.user)})
    state = train_dcgan(cfg, return_state=True)
    assert state.is_failed() and "holds files this project did not write" in state.message
    after = snapshot(world.root)
    assert {k: v for k, v in after.items() if not k.startswith("digits-in/")} == before


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_build_resumes(world):
    """Ctrl-C in the middle of a build: one line, exit 130, and the same command finishes the build, reusing the
    chunks that were done; also when the CLI was started with SIGINT ignored and blocked (in a full test session it
    inherited that, and the Ctrl-C was lost)."""
    import signal
    import time

    folder = digits_folder(world, 480)
    out = world.p("o")
    argv = [sys.executable, "-m", "dcgan.cli", "build-lsun", folder, "--out", out, "--resolution", "32",
            "--shard-rows", "20", "--no-dedup"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    def as_a_harness_may_leave_it():  # SIGINT ignored and blocked in the child: the CLI must still stop on it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    proc = subprocess.Popen(argv, cwd=world.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_harness_may_leave_it)
    deadline = time.monotonic() + 120
    while not list(Path(out).glob("_chunks/part-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "dcgan build-lsun: interrupted" in err
    assert not Path(out, "manifest.json").exists()
    done_before = len(list(Path(out).glob("_chunks/part-*.json")))
    assert 0 < done_before < 24

    again = subprocess.run(argv, cwd=world.root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert shards.read_manifest(out)["counts"]["rows"] == 480
    assert "chunks resumed" in again.stderr


@pytest.mark.slow
def test_ctrl_c_while_ray_stops_after_the_results_keeps_the_commands_exit_status(world):
    """A command's results are printed, then its local Ray takes a second or so to stop: a user who presses Ctrl-C
    then (it looks like a hang) got a KeyboardInterrupt traceback from inside `ray.shutdown` and exit 1 for a build
    that was whole. Now one line says the command had finished, and its exit status stays 0."""
    import signal
    import time

    folder = digits_folder(world, 40)
    out, result = world.p("o"), world.root / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with open(result, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "dcgan.cli", "build-lsun", folder, "--out", out,
                                 "--resolution", "32", "--no-dedup", "--json"], cwd=world.root, env=env,
                                stdout=stdout, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while '"rows"' not in result.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "it ended before its Ray stopped? " + proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "dcgan build-lsun: Ctrl-C while Ray was stopping; the command had finished" in err
    assert shards.read_manifest(out)["counts"]["rows"] == 40
    assert json.loads(result.read_text())["dcgan_result"]["counts"]["rows"] == 40


def test_mlflow_asked_for_without_mlflow_is_one_line_before_training(world, monkeypatch, capfd):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mlflow is installed here: the error this checks cannot happen")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    before = snapshot(world.root)
    assert main(["train", "--config", TINY, "--data", world.dataset, "--run", world.p("fresh")]) == 2
    err = capfd.readouterr().err
    assert "MLFLOW_TRACKING_URI" in err and "pip install mlflow" in err and "Traceback" not in err, err
    assert snapshot(world.root) == before and not Path(world.p("fresh")).exists()
