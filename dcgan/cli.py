"""`dcgan` command line (layer: dcgan): one subcommand per job, each in dcgan/commands/<name>.py with a `register(sub)`.

`dcgan --verbose` (or DCGAN_LOG_LEVEL=INFO) adds Ray's own logs to the console; by default it shows the project's
lines and progress on stderr and the result on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when it emits (tests and Ray replace the stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _OwnInfo(logging.Filter):
    """Below WARNING, the project's own lines only, unless --verbose: a library's INFO chatter reached the console
    through the root logger (botocore's "Found credentials in environment variables." before every S3 command's
    lines, twice before a fault's)."""

    OWN = ("preprocessing", "dcgan", "pipelines", "__main__")

    def filter(self, record: logging.LogRecord) -> bool:
        from preprocessing.compute import verbose

        return record.levelno >= logging.WARNING or record.name.split(".")[0] in self.OWN or verbose()


def log_to_stderr(level: int = logging.INFO) -> None:
    """Progress and log lines on stderr (stdout is for results), once per process."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(_OwnInfo())
        root.addHandler(handler)
    root.setLevel(level)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other known fault (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """Also records each option's flag by its dest (`flag_names`), so an error can name the flag a user typed."""
        namespace, extras = super().parse_known_args(args, namespace)
        names = {a.dest: max(a.option_strings, key=len) for a in self._actions if a.option_strings}
        namespace.flag_names = {**names, **(getattr(namespace, "flag_names", None) or {})}
        return namespace, extras


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dcgan-cluster")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from dcgan.commands import build, dedup, evaluate, info, sample, train

    parser = Parser(prog="dcgan", description="DCGAN at cluster scale (Radford, Metz & Chintala 2016)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs on the console too (same as DCGAN_LOG_LEVEL=INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (info, build, dedup, train, sample, evaluate):  # the order `dcgan --help` lists them
        command.register(sub)
    return parser


def ctrl_c_interrupts() -> None:
    """Ctrl-C (SIGINT) stops a command with one line and exit 130 (`run_command`), also when this process was
    started with SIGINT ignored or blocked, as a parent may leave it (a script's background job, a harness whose
    threads block it): Python then installs no KeyboardInterrupt handler, and a Ctrl-C was silently lost."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # this process is the command (a console script or `python -m dcgan.cli`)
        ctrl_c_interrupts()
    args = build_parser().parse_args(argv)
    if sys.stdout is None:  # started with its standard output closed (`dcgan ... >&-`): print() would drop every
        # result line without a word and the command would still exit 0
        print(f"dcgan {args.command}: error: standard output is closed: its results would be lost; redirect it "
              "(e.g. > result.txt, or > /dev/null to drop them)", file=sys.stderr)
        return 2
    if args.verbose:
        os.environ["DCGAN_LOG_LEVEL"] = "INFO"
    log_to_stderr()
    from preprocessing import compute

    compute.quiet_console()
    code = None
    try:
        code = run_command(f"dcgan {args.command}", lambda: args.func(args))
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket: a bug's traceback
        # stdout's reader left (`dcgan info | head -1`): its choice, not a fault; what is still buffered for stdout
        # goes nowhere, not into a second traceback at the interpreter's exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a command SIGPIPE ended: what a shell expects of `... | head`
    finally:
        if argv is None:  # the command is done: leave Ray now, not at the interpreter's exit (compute.disconnect)
            _leave_ray(f"dcgan {args.command}", code)


def _leave_ray(command: str, code: int | None) -> None:
    """`compute.disconnect`, where a Ctrl-C (a user who takes the second or so that a local Ray takes to stop for a
    hang) was a KeyboardInterrupt traceback and exit 1 after the command's results were printed. The command is
    over: one line says so, and the exit status stays the command's (Ray's exit hook finishes the stop)."""
    from preprocessing import compute

    try:
        compute.disconnect()
    except KeyboardInterrupt:
        done = "; the command had finished: its results above stand" if code == 0 else ""
        print(f"{command}: Ctrl-C while Ray was stopping{done}", file=sys.stderr)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or not a file descriptor
        return False


def run_command(prog: str, fn) -> int:
    """The one error path of every front end (preprocessing.errors): a transient fault is retried with the
    documented backoff (every command resumes what it finished); a known fault is one line on stderr and exit 2;
    Ctrl-C is one line and exit 130 (what was written stays resumable); anything else is a bug and keeps its
    traceback. Inside a Ray Job the project submitted, the fault's class is also printed for the job's follower
    (`dcgan.jobs`), which raises the same class on the caller's side (a transient fault stays retryable there)."""
    from dcgan.stages import JOB_CONFIG_ENV
    from preprocessing import settings
    from preprocessing.errors import classify, retrying

    try:
        settings.check()  # a bad DCGAN_* value is this one line, before the command does anything
        return int(retrying(fn, prog, settings.retry_delays()) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - classified once; a bug keeps its traceback
        fault = classify(err)
        if fault.kind == "bug":
            raise
        print(f"{prog}: error: {fault.line}", file=sys.stderr)
        if JOB_CONFIG_ENV in os.environ:
            print(fault.job_line(), flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
