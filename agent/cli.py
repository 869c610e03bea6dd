"""The `driftwarden` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from driftwarden import __version__
from driftwarden.argtypes import NON_NEGATIVE_SECONDS, POSITIVE_SECONDS
from driftwarden.errors import DriftwardenError, UsageError

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (what was wrong, where to look)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _stop_on_signals() -> threading.Event:
    """Ctrl-C and SIGTERM end a long-running command cleanly (drain, summary, save)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    return stop


def _kinds(text: str) -> frozenset[str]:
    from driftwarden.pipeline import USER_KINDS

    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = kinds - set(USER_KINDS)
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {','.join(sorted(unknown)) or '(empty)'}; "
            f"choose from {','.join(USER_KINDS)}"
        )
    return kinds


def _add_trace(subparsers) -> None:
    p = subparsers.add_parser(
        "trace",
        help="show exec, connect and file-write events from every container",
        description="Attach the probes and print every container's exec, connect and file "
        "writes, attributed to container and image. Ctrl-C stops and prints a summary.",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per line")
    out.add_argument("--summary-only", action="store_true",
                     help="run the whole pipeline but print only the summary at exit")
    p.add_argument("--container", action="append", default=[], metavar="NAME_OR_ID",
                   help="only this container (name or id prefix); repeatable")
    p.add_argument("--kinds", type=_kinds, default=None, metavar="LIST",
                   help="comma list of exec,connect,write (default: all)")
    p.add_argument("--duration", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="stop after this many seconds")
    p.add_argument("--include-host", action="store_true",
                   help="also report processes outside containers")
    p.add_argument("--show-runtime", action="store_true",
                   help="also show the container runtime's own setup writes (runc init)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--record", metavar="FILE", help="also write the raw events to FILE")
    src.add_argument("--replay", metavar="FILE", help="read events from FILE, not the kernel")
    p.add_argument("--dedup-interval", type=NON_NEGATIVE_SECONDS, default=1.0, metavar="SECONDS",
                   help="suppress repeats of an event within this interval in the kernel "
                   "(0 disables; default 1)")
    p.add_argument("--ringbuf-pages", type=int, default=1024, metavar="N",
                   help="ring buffer size in 4 KiB pages, a power of two (default 1024)")
    p.add_argument("--open-result", action="store_true",
                   help="report opens at syscall exit with their result (costs a second "
                   "tracepoint on every open; default: at entry, result null)")
    p.add_argument("--print-bpf", action="store_true",
                   help="print the final BPF program text and exit")
    p.add_argument("--docker-host", default="unix:///var/run/docker.sock",
                   help="Docker Engine API address for container metadata")
    p.add_argument("--cgroup-root", default="", help="cgroup v2 mount (default: detect)")
    p.set_defaults(func=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    from driftwarden.trace import TraceOptions, run_trace

    options = TraceOptions(
        json=args.json,
        summary_only=args.summary_only,
        containers=tuple(args.container),
        kinds=args.kinds,
        duration=args.duration,
        include_host=args.include_host,
        show_runtime=args.show_runtime,
        record=args.record,
        replay=args.replay,
        dedup_interval_ns=int(args.dedup_interval * 1e9),
        ringbuf_pages=args.ringbuf_pages,
        print_bpf=args.print_bpf,
        open_result=args.open_result,
        docker_host=args.docker_host,
        cgroup_root=args.cgroup_root,
    )
    return run_trace(options, _stop_on_signals(), stdout=sys.stdout, stderr=sys.stderr)


def _add_agent(subparsers) -> None:
    p = subparsers.add_parser(
        "agent",
        help="learn each image's behaviour and report drift, novelty and anomalies",
        description="Run the probes, learn a baseline per image (learn -> monitor), and send "
        "alerts to the collector (--collector) and/or JSON lines (--alerts-out). Baselines "
        "and unacknowledged alerts live in --state-dir and survive restarts.",
    )
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="where baselines are kept (created if missing)")
    p.add_argument("--alerts-out", default="-", metavar="FILE",
                   help="append alerts here as JSON lines (default: stdout; with --collector: "
                   "none unless given, - = stdout)")
    p.add_argument("--window", type=POSITIVE_SECONDS, default=10.0, metavar="SECONDS",
                   help="feature window length (default 10)")
    p.add_argument("--startup-grace", type=NON_NEGATIVE_SECONDS, default=10.0, metavar="SECONDS",
                   help="a container's first SECONDS after it (re)started are left out of the "
                   "anomaly model: neither learned nor scored (novelty and drift still apply; "
                   "default 10, 0 = none)")
    p.add_argument("--learn-for", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="end learning after this long even if not yet stable")
    p.add_argument("--mode", choices=("learn", "monitor"), default="learn",
                   help="mode of an image seen for the first time (default learn)")
    p.add_argument("--duration", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="stop after this many seconds")
    p.add_argument("--docker-host", default="unix:///var/run/docker.sock",
                   help="Docker Engine API address for container metadata")
    from driftwarden.agent_cmd import add_collector_flags

    add_collector_flags(p)
    p.set_defaults(func=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    from driftwarden.agent_cmd import options_from_args, run_agent

    return run_agent(options_from_args(args), _stop_on_signals(), stdout=sys.stdout,
                     stderr=sys.stderr)


def _add_baseline(subparsers) -> None:
    p = subparsers.add_parser(
        "baseline",
        help="list, inspect and tune per-image baselines",
        description="Works on a running agent through STATE_DIR/control.sock, or on the "
        "baseline files when no agent runs. IMAGE is an image id (or a unique prefix of its "
        "hex) or name[:tag].",
    )
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    ops = p.add_subparsers(dest="op", metavar="OP", parser_class=_Parser)
    ops.required = True
    ops.add_parser("list", help="every baseline with its mode and size")
    show = ops.add_parser("show", help="one baseline's items and mode history")
    show.add_argument("image")
    mode = ops.add_parser("mode", help="set a baseline's mode")
    mode.add_argument("image")
    mode.add_argument("mode", choices=("learn", "monitor", "protect"))
    mode.add_argument("--reason", default="operator")
    accept = ops.add_parser("accept", help="add a novel alert's behaviour to its baseline")
    accept.add_argument("alert_id")
    reset = ops.add_parser("reset", help="forget a baseline: the image learns again")
    reset.add_argument("image")
    export = ops.add_parser("export", help="write a baseline to a file")
    export.add_argument("image")
    export.add_argument("file")
    imp = ops.add_parser("import", help="load a baseline file (starts in monitor)")
    imp.add_argument("file")
    imp.add_argument("--image", dest="image_id", default=None,
                     help="the image id it is for (refused if the file is another image's)")
    imp.add_argument("--force", action="store_true", help="use it for --image anyway")
    diff = ops.add_parser("diff", help="what image A does that image B never did")
    diff.add_argument("a")
    diff.add_argument("b")
    p.set_defaults(func=_run_baseline)


def _run_baseline(args: argparse.Namespace) -> int:
    import json

    from driftwarden.control import request

    payload = {k: v for k, v in vars(args).items()
               if k in ("op", "image", "mode", "reason", "file", "image_id", "force", "a", "b",
                        "alert_id")
               and v is not None}
    if args.op == "mode":
        payload["who"] = os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"
    result = request(args.state_dir, payload)
    if args.json or args.op in ("show", "diff"):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.op == "list":
        print(f"{'IMAGE':<40} {'MODE':<8} {'VERSION':>7} {'ITEMS':>6} {'WINDOWS':>7}  ID")
        for row in result:
            flag = " (unstable)" if row["unstable"] else ""
            print(f"{row['image']:<40} {row['mode']:<8} {row['version']:>7} {row['items']:>6} "
                  f"{row['windows']:>7}  {row['image_id'][:19]}{flag}")
    else:
        print(json.dumps(result, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="driftwarden", description="Runtime security agent for containers.")
    parser.add_argument("--version", action="version", version=f"driftwarden {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_trace(subparsers)
    _add_agent(subparsers)
    _add_baseline(subparsers)
    from driftwarden import doctor, operator_cmd
    from driftwarden.collector import collector_cmd

    doctor.add_parser(subparsers)
    collector_cmd.add_parser(subparsers)
    operator_cmd.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"driftwarden: error: {exc}", file=sys.stderr)
        return 2
    except DriftwardenError as exc:
        print(f"driftwarden: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `driftwarden trace | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
