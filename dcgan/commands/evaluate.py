"""`dcgan evaluate --run URI`: the paper's evaluation suites on a checkpoint, kept under <run>/eval/step-NNNNNNN/.

Layer: dcgan.
"""

from __future__ import annotations

from dcgan.commands import add_config_flags, config_of, finish


def _suites(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(sub) -> None:
    from dcgan.config import SUITES

    p = sub.add_parser("evaluate", help="evaluate a run: samples, latent experiments, FID/KID, CIFAR-10/SVHN SVMs",
                       description="Evaluate a run's checkpoint with the paper's experiments; the report goes to "
                                   "<run>/eval/. Without --config, the run's own config.yaml is the base.")
    add_config_flags(p)
    p.add_argument("--run", help="run location (default: the config's run)")
    p.add_argument("--suite", type=_suites, dest="evaluate.suites",
                   help=f"comma-separated suites: {','.join(SUITES)} (default: the config's)")
    p.add_argument("--data", help="dataset for memorisation, FID and guided backprop (default: the run's)")
    p.add_argument("--cifar10", dest="evaluate.cifar10", help="cifar-10-python.tar.gz or its directory (or s3://)")
    p.add_argument("--svhn", dest="evaluate.svhn", help="directory with train_32x32.mat and test_32x32.mat (or s3://)")
    p.add_argument("--inception-weights", dest="evaluate.inception_weights",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (path or s3://)")
    p.add_argument("--samples", type=int, dest="evaluate.n_samples", help="samples on the sheet (default 64)")
    p.add_argument("--arithmetic", help='sample-sheet indices, e.g. "1,2,3 - 4,5,6 + 7,8,9"')
    p.add_argument("--boxes", help="JSON of object boxes drawn on the sample sheet, for the forgetting suite")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest valid one)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="evaluate each valid checkpoint that has no evaluation yet (oldest first)")
    p.add_argument("--force", action="store_true", help="evaluate again a step already evaluated with these suites")
    p.set_defaults(func=run)


def call_of(args):
    from dcgan.stages import StageCall
    from dcgan.run_state import stored_config
    from preprocessing.storage import resolve_location

    base = stored_config(resolve_location(args.run)) if args.run and not args.config else None
    options = {"arithmetic": args.arithmetic, "boxes": args.boxes, "step": args.step, "device": args.device,
               "every_checkpoint": args.every_checkpoint, "force": args.force}
    return StageCall("evaluate", config_of(args, base=base), options)


def summary(r: dict) -> str:
    if r["metrics"] is None:
        return f"every checkpoint of {r['run']} is evaluated already; index: {r['report']}"
    lines = [f"{name:<16} {m['status']}" for name, m in r["metrics"]["suites"].items()]
    return "\n".join(lines + [f"report: {r['report']} (and report.html, metrics.json); all evaluations: {r['index']}"])


def run(args) -> int:
    return finish(args, call_of(args), summary)
