"""What a person watching sees: progress lines and bars, their listeners, and a quiet `make demo`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocessing import progress
from preprocessing.progress import Progress, Update

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a person's stderr does."""

    def isatty(self) -> bool:
        return True


def test_lines_when_not_a_terminal_at_most_every_tenth_and_always_the_last():
    out = io.StringIO()
    with Progress("build", 100, "inputs", stream=out, interval=0) as shown:
        for _ in range(100):
            shown.advance(1, note="rows so far")
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 11, lines  # a line per tenth, not per update
    last = Update.parse(lines[-1])
    assert last is not None and (last.what, last.done, last.total, last.unit) == ("build", 100, 100, "inputs")
    assert "100%" in lines[-1] and "inputs/s" in lines[-1] and "rows so far" in lines[-1]


def test_an_interval_holds_lines_back_and_the_eta_counts_down():
    out = io.StringIO()
    shown = Progress("train", 1000, "steps", initial=200, stream=out, interval=3600)
    for step in range(201, 1001):
        shown.update(step)
        if step == 400:
            assert out.getvalue() == ""  # an hour between lines: nothing yet
            snap = shown.snapshot()
            assert snap.rate and snap.rate > 0 and snap.eta_s is not None and snap.eta_s > 0
    shown.close()
    assert len(out.getvalue().splitlines()) == 1 and "1000/1000 steps" in out.getvalue()


def test_a_terminal_gets_a_bar_and_no_lines():
    tty = Terminal()
    with Progress("dedup", 5, "phases", stream=tty) as shown:
        for i in range(1, 6):
            shown.update(i)
    text = tty.getvalue()
    assert "dedup" in text and "5/5" in text and "[progress]" not in text


def test_listeners_hear_every_step_even_when_nothing_is_shown():
    heard: list[Update] = []
    out = io.StringIO()
    with progress.listen(heard.append):
        with Progress("evaluate", 3, "suites", stream=out, show=False, interval=0) as shown:
            for i in range(1, 4):
                shown.update(i)
    assert out.getvalue() == ""
    assert [u.done for u in heard][-1] == 3 and heard[-1].percent == 100.0
    assert not progress.listening()


def test_a_ray_jobs_progress_line_reaches_the_listeners():
    heard: list[Update] = []
    line = ("[ray job] (RayTrainWorker pid=77) [progress] train 300/1200 steps  25%  2.5 steps/s  ETA 0:06:00  "
            "loss_D 0.5")
    with progress.listen(heard.append):
        assert progress.relay(line)
        assert not progress.relay("[ray job] something else")
    assert len(heard) == 1
    u = heard[0]
    assert (u.what, u.done, u.total, u.unit, u.rate, u.eta_s) == ("train", 300, 1200, "steps", 2.5, 360)


def test_a_broken_listener_does_not_stop_the_work():
    def broken(update):
        raise RuntimeError("the UI is down")

    with progress.listen(broken):
        with Progress("build", 2, "inputs", stream=io.StringIO(), interval=0) as shown:
            shown.advance(2)


def test_cli_help_is_fast_and_has_version_and_verbose():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dcgan.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "--verbose" in done.stdout and "--version" in done.stdout
    assert elapsed < 3.0, elapsed  # 1.5 s on an idle machine; CI shares its two cores


@pytest.mark.slow
def test_the_demo_prints_stages_progress_and_summary_in_under_60_lines(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DCGAN_PROGRESS_INTERVAL": "5"}
    env.pop("PREFECT_API_URL", None)
    env.pop("DCGAN_LOG_LEVEL", None)
    # the demo's own config, made quick: one dedup epoch, the suites that need no classifier, few steps and digits
    # (every stage still runs and reports: 200 digits are 6 batches, 12 steps 2 epochs)
    config = tmp_path / "demo.yaml"
    config.write_text((REPO / "configs" / "demo-mnist-32.yaml").read_text().replace("epochs: 5", "epochs: 1")
                      .replace("suites: [samples, walks, arithmetic, forgetting, guided-backprop, memorisation, "
                               "digits, fid, cifar10, svhn]", "suites: [samples, walks, fid]"))
    done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--root", str(tmp_path / "runs"), "--config",
                           str(config), "--steps", "12", "--digits", "200"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = done.stdout + done.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) < 60, text
    for noise in ("Execution plan", "Progress bars disabled", "Deprecat", "Warning", "Traceback",
                  "Setting up process group", "PreemptionWatcher"):
        assert noise not in text, noise
    for stage in ("center-crop", "dedup", "train", "evaluate"):
        assert f"[progress] {stage} " in text, stage
    assert "demo finished" in done.stdout and "[progress]" not in done.stdout  # progress on stderr, results on stdout
    assert "\x1b[" not in done.stdout + done.stderr  # a log, not a terminal: no colours or cursor moves


def test_a_prefect_api_that_does_not_answer_is_one_line_before_the_demo_writes_anything(tmp_path):
    """PREFECT_API_URL naming a server that is not there, set in the Prefect profile (as `prefect config set` leaves
    it: the demo's "temporary local server" was not that) or in the environment, was a traceback from inside
    Prefect's client after the digits were exported and Ray had started: now the demo's one line, exit 2, before it
    writes anything. Malformed, it is bad input; a live server is kept (tests/test_cluster.py's Prefect runs)."""
    from conftest import free_port
    from prefect_server import BIN

    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DCGAN_RETRY_DELAYS_S": ""}  # no retry: its line
    env.pop("PREFECT_API_URL", None)
    subprocess.run([str(BIN / "prefect"), "config", "set", f"PREFECT_API_URL={dead}"], env=env, check=True,
                   capture_output=True, timeout=120)
    runs = tmp_path / "runs"
    for extra, said in (({}, f"demo: error: the Prefect API at {dead} (PREFECT_API_URL) does not answer ("),
                        ({"PREFECT_API_URL": "no-scheme"}, "demo: error: PREFECT_API_URL 'no-scheme' is not a URL")):
        done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--root", str(runs), "--digits", "10"],
                              capture_output=True, text=True, cwd=REPO, env={**env, **extra}, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1].startswith(said), done.stderr[-1000:]
    assert not runs.exists()


def test_every_subcommand_has_a_description_and_every_flag_a_help():
    import argparse

    from dcgan.cli import build_parser

    undescribed = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                undescribed += [name] if not sub.description else []
                undescribed += [f"{name} {a.option_strings or a.dest}" for a in sub._actions
                                if not a.help and not isinstance(a, argparse._HelpAction)]
            undescribed += [f"{c.dest} (summary)" for c in action._choices_actions if not c.help]
    assert undescribed == []
