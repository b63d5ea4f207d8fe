"""What the `dcgan` CLI does to its console before Ray starts (preprocessing.compute.quiet_console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import os; from preprocessing.compute import quiet_console; quiet_console(); "
         "print(os.environ.get('RAY_DATA_DISABLE_PROGRESS_BARS'), os.environ.get('RAY_COLOR_PREFIX'))")


def test_a_console_that_is_a_log_file_gets_no_progress_bars_nor_colour(tmp_path):
    """Ray Data's bars are redrawn with carriage returns: a dedup's log file got every redraw of Ray Train's dataset
    split (seen in benchmarks/scale.py's logs) until the CLI turned them off for a console that is not a terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX")}
    with open(tmp_path / "stderr.log", "w") as log:
        out = subprocess.run([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT,
                             text=True, check=True).stdout.split()
    assert out == ["1", "0"]
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "0"  # a user's own choice stands
    with open(tmp_path / "stderr.log", "w") as log:
        out = subprocess.run([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT,
                             text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_a_closed_standard_output_is_one_line_not_results_silently_lost():
    """`dcgan info >&-`: Python sets sys.stdout to None, print() then writes nothing, and the command exited 0."""
    proc = subprocess.run(["sh", "-c", f"exec {sys.executable} -m dcgan.cli info >&-"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dcgan info: error: standard output is closed: its results would be lost; redirect it (e.g. > result.txt, "
        "or > /dev/null to drop them)"]


def test_a_reader_that_stops_reading_is_not_a_traceback():
    """`dcgan info | head -1`: the reader closes the pipe, the next write fails with EPIPE. It was a BrokenPipeError
    traceback (exit 1) and, at the interpreter's exit, a second "Exception ignored" one; now the exit status a
    command ended by SIGPIPE has (141) and nothing on stderr. Here the reader is gone before the first write."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "dcgan.cli", "info"], stdout=write, stderr=subprocess.PIPE,
                            cwd=ROOT, text=True)
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err == ""


def test_the_training_summary_gives_the_step_once_as_a_whole_number():
    """The step also came among the metrics' figures, as `step 4.000`."""
    from dcgan.commands.train import summary

    text = summary({"run": "r", "step": 4, "checkpoint": "r/checkpoints/step-0000004", "samples": "s.png",
                    "metrics": {"step": 4.0, "loss_d": 1.5, "epoch": 2.0, "images_per_s": 300.25}})
    assert text.splitlines() == ["run r at step 4: checkpoint r/checkpoints/step-0000004, samples s.png",
                                 "loss_d 1.500, images_per_s 300.250"]
