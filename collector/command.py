"""`driftwarden collector`: run the collector until SIGINT or SIGTERM.

It prints one line saying where it listens and where its data lives, prunes the store to the
retention period at start and every hour, and stops cleanly on a signal (agents reconnect and
replay their spools when it is back).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import TextIO

from driftwarden.collector.baselines import DEFAULT_CONSENSUS, MAX_CONSENSUS, FleetSettings
from driftwarden.collector.outputs import load_outputs
from driftwarden.collector.policy import DEFAULT_POLICY, load_policy
from driftwarden.collector.server import (
    DEFAULT_LISTEN,
    UNARY_RESERVE,
    CollectorConfig,
    CollectorServer,
)
from driftwarden.core.argtypes import (
    NON_NEGATIVE_SECONDS,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    number,
)
from driftwarden.core.errors import StoreError, UsageError
from driftwarden.core.learning import LearningPolicy
from driftwarden.core.lifecycle import settle_heap, shorten_switch_interval
from driftwarden.core.tls import TlsFiles

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0
DEFAULT_RETENTION_DAYS = 30.0
# one stream per agent (node) plus one per live subscriber; each holds a pool thread (and an
# agent's a reader thread too): 256 serves a few hundred nodes, raise it for more
DEFAULT_MAX_STREAMS = 256
MAX_STREAMS_LIMIT = 4096
MAX_STREAMS = number(int, minimum=1, maximum=MAX_STREAMS_LIMIT)
RETENTION_DAYS = number(float, unit="days", bound="a number of days >= 0")
CONSENSUS = number(int, minimum=1, maximum=MAX_CONSENSUS)
_LEARNING = LearningPolicy()  # the defaults the help texts show
_DAY = 86400.0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "collector",
        help="receive alerts from agents, store them, stream them to operators, act by policy",
        description="Run the collector: agents connect with AgentChannel.Connect, operators "
                    "use Alerts, Actions, Agents and Baselines (gRPC, driftwarden.v1). Alerts, "
                    "the fleet's baselines and the audit log live in one SQLite file (--db) or "
                    "a PostgreSQL database (--store). Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"gRPC address (default {DEFAULT_LISTEN}; loopback only unless "
                             "--allow-non-loopback)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="PATH",
                       help="the SQLite store (created if missing)")
    where.add_argument("--store", metavar="URL",
                       help="a PostgreSQL store instead: postgresql://USER@HOST:PORT/DB (the "
                            "database must exist; its tables are made or migrated at start)")
    parser.add_argument("--policy", metavar="FILE",
                        help="response policy YAML (default: quarantine high drift of images "
                             "in protect mode; see deploy/policy.example.yaml)")
    parser.add_argument("--tls-cert", metavar="FILE", help="the collector's certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="CA that signs agent and operator certificates; clients must "
                             "present one (mutual TLS)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="operator calls must send this token as 'authorization: Bearer'")
    parser.add_argument("--outputs", metavar="FILE",
                        help="send every new alert to the outputs this YAML or JSON file lists "
                             "(webhook, syslog, jsonfile; see README, Outputs)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback)")
    parser.add_argument("--retention-days", type=RETENTION_DAYS,
                        default=DEFAULT_RETENTION_DAYS, metavar="N",
                        help=f"delete alerts and audit entries older than N days, at start "
                             f"and hourly (default {DEFAULT_RETENTION_DAYS:g}; 0 keeps all)")
    parser.add_argument("--max-streams", type=MAX_STREAMS, default=DEFAULT_MAX_STREAMS,
                        metavar="N",
                        help=f"streams served at once: agents (one each) plus live "
                             f"subscribers; more are refused with RESOURCE_EXHAUSTED (each "
                             f"holds a thread; default {DEFAULT_MAX_STREAMS})")
    learning = parser.add_argument_group(
        "fleet baselines", "Agents learn each image together; the collector merges what they "
                           "show and ends learning for the whole fleet.")
    learning.add_argument("--consensus", type=CONSENSUS, default=DEFAULT_CONSENSUS,
                          metavar="N",
                          help=f"an item is learned when N containers showed it, if N ran the "
                               f"image while it learned (else one is enough); the others are "
                               f"held back as unconfirmed (default {DEFAULT_CONSENSUS})")
    learning.add_argument("--learn-for", type=POSITIVE_SECONDS, default=None,
                          metavar="SECONDS",
                          help="end an image's learning after this long even if not yet stable")
    learning.add_argument("--learn-warmup", type=NON_NEGATIVE_SECONDS,
                          default=_LEARNING.warmup_seconds, metavar="SECONDS",
                          help=f"learning never ends before this (default "
                               f"{_LEARNING.warmup_seconds:g})")
    learning.add_argument("--learn-stable-for", type=POSITIVE_SECONDS,
                          default=_LEARNING.stable_seconds, metavar="SECONDS",
                          help=f"stable: no new item for this long (default "
                               f"{_LEARNING.stable_seconds:g})")
    learning.add_argument("--learn-min-windows", type=POSITIVE_INT,
                          default=_LEARNING.min_windows, metavar="N",
                          help=f"clean feature windows, over all nodes, needed before learning "
                               f"ends (default {_LEARNING.min_windows})")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="allow a non-loopback --listen address (real deployments; needs "
                             "the --tls-* flags)")
    parser.set_defaults(func=run_command)
    return parser


def config_from_args(args: argparse.Namespace) -> CollectorConfig:
    """The flags as a CollectorConfig; UsageError (one line) for anything wrong."""
    # unreadable or not PEM: fail now, with the flag's name
    tls = TlsFiles.from_flags(ca=args.tls_client_ca, cert=args.tls_cert, key=args.tls_key,
                              ca_flag="--tls-client-ca", pair_required=True)
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {args.token_file}: cannot read it ({exc})") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file}: the file is empty")
    policy = load_policy(args.policy) if args.policy else DEFAULT_POLICY
    outputs = load_outputs(args.outputs) if args.outputs else ()
    db = None if args.db is None else Path(args.db)
    if db is not None and db.is_dir():
        raise UsageError(f"--db {db}: is a directory; give a file path, e.g. {db}/collector.db")
    if db is not None and not db.parent.is_dir():
        raise UsageError(f"--db {db}: directory {db.parent} does not exist; create it first")
    fleet = FleetSettings(
        consensus=args.consensus,
        policy=LearningPolicy(warmup_seconds=args.learn_warmup,
                              stable_seconds=args.learn_stable_for,
                              min_windows=args.learn_min_windows, learn_for=args.learn_for))
    return CollectorConfig(db_path=db, store_url=args.store, listen=args.listen, policy=policy,
                           tls=tls, operator_token=token, metrics_listen=args.metrics,
                           allow_non_loopback=args.allow_non_loopback,
                           max_streams=args.max_streams,
                           max_workers=args.max_streams + UNARY_RESERVE, fleet=fleet,
                           outputs=outputs)


def run_command(args: argparse.Namespace) -> int:
    from driftwarden.core.lifecycle import stop_on_signals

    config = config_from_args(args)
    return run_collector(config, stop_on_signals(), retention_days=args.retention_days)


def run_collector(config: CollectorConfig, stop: threading.Event, *,
                  retention_days: float = DEFAULT_RETENTION_DAYS,
                  prune_interval: float = PRUNE_INTERVAL, stdout: TextIO | None = None) -> int:
    """Serve until `stop` is set; prune at start and every `prune_interval` seconds."""
    stdout = stdout or sys.stdout
    with CollectorServer(config) as server:
        if retention_days > 0:
            _prune(server, retention_days)
        security = "mTLS" if config.tls is not None else "plaintext"
        auth = "operator token required" if config.operator_token else (
            "operator certificate required" if config.tls is not None
            else "no operator auth")
        metrics = f", metrics at {server.metrics_url}" if server.metrics_url else ""
        metrics += "".join(f", output {o.name}: {o.sink.describe()}" for o in config.outputs)
        settle_heap()
        shorten_switch_interval()
        print(f"driftwarden collector listening on {server.address} ({security}, {auth}), "
              f"data in {config.data_location}{metrics}", file=stdout, flush=True)
        while not stop.wait(prune_interval):
            if retention_days > 0:
                _prune(server, retention_days)
    return 0


def _prune(server: CollectorServer, retention_days: float) -> None:
    try:
        result = server.store.prune(retention_days * _DAY)
    except StoreError as exc:  # keep serving: pruning is housekeeping
        log.error("retention: pruning the store failed: %s", exc)
        return
    log.info("retention (%g days): pruned %d alerts, %d audit entries, %d containers",
             retention_days, result.alerts, result.audit, result.containers)


__all__ = ["add_parser", "config_from_args", "run_collector", "run_command"]
