"""`dcgan evaluate --run URI`: the paper's evaluation suites on a run, written to <run>/eval/report.{md,html}."""

from __future__ import annotations

from preprocessing.errors import InputError

from dcgan.config import EvalConfig, load_config


def register(sub) -> None:
    from dcgan.evaluation.report import SUITES

    p = sub.add_parser("evaluate", help="evaluate a run: samples, latent experiments, FID/KID, CIFAR-10/SVHN SVMs")
    p.add_argument("--run", help="run URI (default: the config's run)")
    p.add_argument("--config", help="YAML config whose `evaluate` section and run to use")
    p.add_argument("--suite", help=f"comma-separated suites: {','.join(SUITES)} (default: the config's)")
    p.add_argument("--data", help="dataset URI for memorisation, FID and guided backprop (default: the run's)")
    p.add_argument("--cifar10", help="cifar-10-python.tar.gz or its directory (local or s3://)")
    p.add_argument("--svhn", help="directory with train_32x32.mat and test_32x32.mat (local or s3://)")
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (path or s3://)")
    p.add_argument("--arithmetic", help='sample-sheet indices, e.g. "1,2,3 - 4,5,6 + 7,8,9"')
    p.add_argument("--boxes", help="JSON of object boxes drawn on the sample sheet, for the forgetting suite")
    p.add_argument("--samples", type=int, help="samples on the sheet (EvalConfig.n_samples)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    p.set_defaults(func=run)


def eval_config(args, base: EvalConfig) -> EvalConfig:
    """The config's evaluate section with the command line's choices on top."""
    data = base.model_dump()
    if args.suite:
        data["suites"] = [s.strip() for s in args.suite.split(",") if s.strip()]
    for key, value in (("cifar10", args.cifar10), ("svhn", args.svhn), ("inception_weights", args.inception_weights),
                       ("n_samples", args.samples)):
        if value is not None:
            data[key] = value
    return EvalConfig.model_validate(data)


def run(args) -> int:
    from dcgan.evaluation.report import evaluate

    from preprocessing.storage import resolve_location

    cfg = load_config(args.config) if args.config else None
    run_uri = resolve_location(args.run) or (cfg.run_uri if cfg else None)
    if not run_uri:
        raise InputError("give --run URI (or --config naming the run)")
    base = cfg.evaluate if cfg else _run_eval_config(run_uri)
    metrics = evaluate(run_uri, eval_config(args, base), data_uri=resolve_location(args.data),
                       arithmetic=args.arithmetic, boxes=args.boxes, step=args.step, device=args.device)
    for name, m in metrics["suites"].items():
        print(f"{name:<16} {m['status']}")
    print(f"report: {run_uri.rstrip('/')}/eval/report.md (and report.html, metrics.json)")
    return 0


def _run_eval_config(run_uri: str) -> EvalConfig:
    """The evaluate section the run was trained with (stored in its config.yaml), else the defaults."""
    from dcgan.train import stored_config

    stored = stored_config(run_uri)
    return stored.evaluate if stored else EvalConfig()
