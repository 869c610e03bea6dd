"""`driftwarden baseline OP ... --collector ADDR`: the fleet's baselines, held by the collector
(a client of its driftwarden.v1 Baselines service).

Operations (:func:`run_baseline` dispatches on ``args.op``)
    ``list``                      every baseline, newest change first: IMAGE KEY MODE VERSION
                                  ITEMS UNCONFIRMED WINDOWS UPDATED NODES
    ``show IMAGE``                the summary, items by kind, unconfirmed items with the
                                  containers (``name@node``) that showed them, mode history
    ``mode IMAGE MODE --reason``  learn | monitor | protect; the reason is required
    ``diff A B``                  what each image's baseline has that the other's never did
    ``accept ALERT_ID``           a NOVEL alert's behaviour joins its image's baseline
    ``reset IMAGE --reason``      forget items and windows: the image learns again
    ``export IMAGE FILE``         the baseline file (msgpack, the format ``--state-dir`` export
                                  and ``driftwarden learn`` write)
    ``push FILE``                 store a baseline file for its image key (``--image KEY``
                                  makes sure it is that one's; ``--mode``, default monitor)

IMAGE is an image key (``sha256:...``), a unique prefix of its hex, or ``name[:tag]`` (the
collector resolves it); ``name@sha256:...`` is taken as its digest. Output as the other
operator commands: tables on a terminal, plain lines never cut when piped or with ``--plain``,
one JSON object per line with ``--json``; every text from the collector cleaned of control
characters. Exit codes: 0 done; 1 the call failed; 2 bad input (a missing reason, an
unreadable or non-baseline file, an image or alert the collector does not know, a request it
refused as INVALID_ARGUMENT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from driftwarden.core import wire
from driftwarden.core.baselines import unpack_baseline
from driftwarden.core.errors import BaselineError, UsageError
from driftwarden.ops.client import Missing, operator_channel, report_rpc_error
from driftwarden.ops.format import (
    baseline_dict,
    baseline_label,
    baseline_summary_dict,
    clean_text,
    enum_text,
    format_time,
    item_dict,
    item_order,
    item_text,
)
from driftwarden.ops.listing import CALL_TIMEOUT
from driftwarden.ops.printers import print_line, print_table, rich_console
from driftwarden.ops.tables import (
    BASELINES,
    DIFF,
    HISTORY,
    ITEMS,
    UNCONFIRMED,
    baseline_row,
    diff_row,
    history_row,
    item_row,
    unconfirmed_row,
)
from driftwarden.proto.v1 import baselines_pb2, baselines_pb2_grpc
from rich.console import Console

log = logging.getLogger(__name__)

OPERATIONS = ("list", "show", "mode", "diff", "accept", "reset", "export", "push")
IMAGE_HELP = ("an image key (sha256:<hex>), a unique prefix of its hex, name[:tag] or "
              "name@sha256:<hex>")
_LIST_HINT = "`driftwarden baseline list --collector ADDR` shows the images it holds baselines for"


class _CallFailed(Exception):
    """A Baselines call failed; the reason is printed already, `exit_code` says how."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


# -- input ---------------------------------------------------------------------------------------


def image_reference(text: str, what: str = "IMAGE") -> str:
    """What the collector resolves: the text as given, ``name@sha256:...`` as its digest."""
    cleaned = text.strip()
    if not cleaned:
        raise UsageError(f"{what} is empty: give {IMAGE_HELP}")
    if "@" in cleaned:
        digest = cleaned.partition("@")[2]
        if not digest.startswith("sha256:") or len(digest) == len("sha256:"):
            raise UsageError(f"{what} {clean_text(text)!r}: after @ comes the image's digest, "
                             f"sha256:...")
        return digest
    return cleaned


def required_reason(args: argparse.Namespace) -> str:
    """``--reason`` for mode and reset: it goes into the audit trail and the mode history."""
    reason = (args.reason or "").strip()
    if not reason:
        raise UsageError(f"baseline {args.op} needs --reason TEXT: why, for the audit trail and "
                         f"the baseline's mode history (it reaches every agent that runs the "
                         f"image)")
    return reason


def read_baseline_file(path: str) -> tuple[bytes, str, str]:
    """A baseline file's bytes, image key and image name; UsageError, naming the file, when it
    cannot be read, is too large for one call or is not a usable baseline file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None
    if len(data) > wire.MAX_MESSAGE_BYTES - 64 * 1024:
        raise UsageError(f"{path} is {len(data)} bytes; a baseline pushed in one call must stay "
                         f"under {wire.MAX_MESSAGE_BYTES // (1024 * 1024)} MiB")
    try:
        key, name = baseline_file_image(data)
    except BaselineError as exc:
        raise UsageError(f"{path}: {exc}; push a file `driftwarden baseline export` or "
                         f"`driftwarden learn` wrote") from None
    return data, key, name


def baseline_file_image(data: bytes) -> tuple[str, str]:
    """The image key and name of a baseline file's bytes; BaselineError when they are not a
    usable baseline file (:func:`driftwarden.core.baselines.unpack_baseline`)."""
    baseline = unpack_baseline(data)
    return baseline.image_key, baseline.image_name


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temp file beside it, then a rename)."""
    part = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        part.write_bytes(data)
        os.replace(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise UsageError(f"cannot write {path} ({exc.strerror or exc})") from None


# -- calls ---------------------------------------------------------------------------------------


def list_baselines(stub: baselines_pb2_grpc.BaselinesStub
                   ) -> list[baselines_pb2.BaselineSummary]:
    """Every baseline the collector holds, newest change first."""
    return list(stub.List(baselines_pb2.ListBaselinesRequest(), timeout=CALL_TIMEOUT).baselines)


def _call(args: argparse.Namespace, err: TextIO, call: Callable[[Any], Any],
          missing: Missing | None = None) -> Any:
    """`call(stub)` on a channel the client flags describe; a failure is reported on `err`."""
    with operator_channel(args) as channel:
        try:
            return call(baselines_pb2_grpc.BaselinesStub(channel))
        except grpc.RpcError as exc:
            raise _CallFailed(report_rpc_error(exc, args, err, missing=missing)) from None


def _image_missing(image: str) -> Missing:
    return Missing(f"baseline for image {clean_text(image)!r}", _LIST_HINT)


# -- output --------------------------------------------------------------------------------------


class _Output:
    """Where one operation prints: JSON lines, or lines and tables (rich on a terminal)."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.out = out
        self.json = args.json
        self.console: Console | None = rich_console(args, out)

    def object(self, data: dict[str, Any]) -> None:
        print(json.dumps(data), file=self.out, flush=True)

    def line(self, text: str, style: str = "") -> None:
        print_line(text, self.console, self.out, style)

    def table(self, columns: Any, rows: Sequence[Any]) -> None:
        print_table(columns, rows, self.console, self.out)

    def section(self, title: str, count: int, columns: Any, rows: Sequence[Any],
                note: str = "") -> None:
        """A blank line, ``title (count): note`` and its table, or ``title: none``."""
        self.line("")
        if not rows:
            self.line(f"{title}: none", "bold")
            return
        self.line(f"{title} ({count}){': ' + note if note else ''}", "bold")
        self.table(columns, rows)


def _mode_text(summary: baselines_pb2.BaselineSummary) -> str:
    mode = enum_text(wire.MODE, summary.mode)
    if summary.HasField("learning_started_at"):
        since = f"learning since {format_time(summary.learning_started_at)}"
        return f"{mode} ({since}{', stable' if summary.stable else ''})"
    return mode


def summary_fields(baseline: baselines_pb2.Baseline) -> list[tuple[str, str]]:
    """`baseline show`'s first lines: (field, value)."""
    s = baseline.summary
    updated = s.updated_at if s.HasField("updated_at") else None
    fields = [("image", s.image_name or "-"), ("key", s.image_key), ("mode", _mode_text(s)),
              ("version", str(s.version)), ("updated", format_time(updated)),
              ("items", f"{s.items} learned, {s.unconfirmed} unconfirmed"),
              ("windows", str(s.windows)),
              ("containers", f"{s.containers} ran it while it learned"),
              ("nodes", ", ".join(s.nodes) or "-")]
    if s.HasField("carried_from"):
        fields.append(("carried from", s.carried_from))
    if baseline.layers:
        fields.append(("layers", str(len(baseline.layers))))
    return fields


# -- operations ----------------------------------------------------------------------------------


def _list(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    baselines = _call(args, err, list_baselines)
    if output.json:
        for summary in baselines:
            output.object(baseline_summary_dict(summary))
        return 0
    if not baselines:
        output.line("no baselines on this collector yet: agents send what images do while "
                    "they learn, or push a file with `driftwarden baseline push`")
        return 0
    output.table(BASELINES, [baseline_row(s) for s in baselines])
    return 0


def _show(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    image = image_reference(args.image)
    request = baselines_pb2.GetBaselineRequest(image=image)
    baseline = _call(args, err, lambda stub: stub.Get(request, timeout=CALL_TIMEOUT),
                     _image_missing(image)).baseline
    if output.json:
        output.object(baseline_dict(baseline))
        return 0
    fields = summary_fields(baseline)
    width = max(len(name) for name, _ in fields) + 2
    for name, value in fields:
        output.line(f"{name:<{width}}{value}")
    items = sorted(baseline.items, key=item_order)
    output.section("items", len(items), ITEMS, [item_row(i) for i in items])
    unconfirmed = sorted(baseline.unconfirmed, key=lambda e: item_order(e.item))
    output.section("unconfirmed", len(unconfirmed), UNCONFIRMED,
                   [unconfirmed_row(e) for e in unconfirmed],
                   "shown by too few containers to be learned")
    output.section("mode history", len(baseline.history), HISTORY,
                   [history_row(c) for c in baseline.history])
    return 0


def _changed(output: _Output, summary: baselines_pb2.BaselineSummary, what: str) -> int:
    """A baseline the operator changed: its summary as JSON, or ``LABEL: what``."""
    if output.json:
        output.object(baseline_summary_dict(summary))
    else:
        output.line(f"{baseline_label(summary)}: {what}")
    return 0


def _mode(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    image = image_reference(args.image)
    request = baselines_pb2.SetBaselineModeRequest(image=image, mode=wire.MODE.to_proto(args.mode),
                                                   reason=required_reason(args))
    summary = _call(args, err, lambda stub: stub.SetMode(request, timeout=CALL_TIMEOUT),
                    _image_missing(image)).baseline
    return _changed(output, summary, f"mode {enum_text(wire.MODE, summary.mode)}, version "
                    f"{summary.version}")


def _diff(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    a, b = image_reference(args.a, "A"), image_reference(args.b, "B")
    request = baselines_pb2.DiffBaselinesRequest(a=a, b=b)
    missing = Missing(f"baseline for image {clean_text(a)!r} or {clean_text(b)!r}", _LIST_HINT)
    response = _call(args, err, lambda stub: stub.Diff(request, timeout=CALL_TIMEOUT), missing)
    only_a = sorted(response.only_in_a, key=item_order)
    only_b = sorted(response.only_in_b, key=item_order)
    if output.json:
        output.object({"a": baseline_summary_dict(response.a),
                       "b": baseline_summary_dict(response.b),
                       "only_in_a": [item_dict(i) for i in only_a],
                       "only_in_b": [item_dict(i) for i in only_b]})
        return 0
    label_a, label_b = baseline_label(response.a), baseline_label(response.b)
    if not only_a and not only_b:
        output.line(f"{label_a} and {label_b} have the same items")
        return 0
    output.line(f"A = {label_a}, version {response.a.version}: {len(only_a)} items B never had")
    output.line(f"B = {label_b}, version {response.b.version}: {len(only_b)} items A never had")
    output.table(DIFF, [*(diff_row("A", i) for i in only_a), *(diff_row("B", i) for i in only_b)])
    return 0


def _accept(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    alert_id = args.alert_id.strip()
    if not alert_id:
        raise UsageError("ALERT_ID is empty: give the id of a NOVEL alert (`driftwarden alerts "
                         "--kind novel` lists them)")
    request = baselines_pb2.AcceptAlertRequest(alert_id=alert_id, reason=args.reason or "")
    missing = Missing(f"alert {clean_text(alert_id)!r}",
                      "`driftwarden alerts --kind novel` lists the stored NOVEL alerts")
    response = _call(args, err, lambda stub: stub.Accept(request, timeout=CALL_TIMEOUT), missing)
    added = sorted(response.added, key=item_order)
    if output.json:
        output.object({"alert_id": alert_id, "baseline": baseline_summary_dict(response.baseline),
                       "added": [item_dict(i) for i in added]})
        return 0
    label = baseline_label(response.baseline)
    if not added:
        output.line(f"alert {alert_id}: {label} already has its behaviour (version "
                    f"{response.baseline.version})")
        return 0
    output.line(f"accepted alert {alert_id} into {label}, version {response.baseline.version}:")
    for item in added:
        output.line(f"  {item_text(item)}")
    return 0


def _reset(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    image = image_reference(args.image)
    request = baselines_pb2.ResetBaselineRequest(image=image, reason=required_reason(args))
    summary = _call(args, err, lambda stub: stub.Reset(request, timeout=CALL_TIMEOUT),
                    _image_missing(image)).baseline
    return _changed(output, summary, f"reset, it learns again (mode "
                    f"{enum_text(wire.MODE, summary.mode)}, version {summary.version})")


def _export(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    image = image_reference(args.image)
    path = Path(args.file)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: no directory {path.parent}")
    request = baselines_pb2.ExportBaselineRequest(image=image)
    data = _call(args, err, lambda stub: stub.Export(request, timeout=CALL_TIMEOUT),
                 _image_missing(image)).file
    try:
        key, name = baseline_file_image(data)
    except BaselineError as exc:
        print(f"driftwarden: error: the collector sent a file that is {exc}; nothing written "
              f"to {path}", file=err, flush=True)
        return 1
    write_file(path, data)
    if output.json:
        output.object({"file": str(path), "bytes": len(data), "image_key": key,
                       "image_name": name})
    else:
        label = baseline_label(baselines_pb2.BaselineSummary(image_key=key, image_name=name))
        output.line(f"wrote the baseline of {label} to {path} ({len(data)} bytes)")
    return 0


def _push(args: argparse.Namespace, output: _Output, err: TextIO) -> int:
    data, key, name = read_baseline_file(args.file)
    if args.image_id is not None:
        wanted = image_reference(args.image_id, "--image")
        if wanted != key:
            raise UsageError(f"{args.file} is the baseline of image {key} "
                             f"({clean_text(name) or 'no name'}), not {clean_text(wanted)}; "
                             f"push the file learned for that image")
    mode = wire.MODE.to_proto(args.mode) if args.mode else 0
    request = baselines_pb2.PushBaselineRequest(file=data, image_key=key, mode=mode,
                                                reason=args.reason or "")
    summary = _call(args, err, lambda stub: stub.Push(request, timeout=CALL_TIMEOUT)).baseline
    return _changed(output, summary, f"pushed from {args.file} (mode "
                    f"{enum_text(wire.MODE, summary.mode)}, version {summary.version}, "
                    f"{summary.items} items)")


_OPERATIONS: dict[str, Callable[[argparse.Namespace, _Output, TextIO], int]] = {
    "list": _list, "show": _show, "mode": _mode, "diff": _diff, "accept": _accept,
    "reset": _reset, "export": _export, "push": _push}


def run_baseline(args: argparse.Namespace, *, out: TextIO | None = None,
                 err: TextIO | None = None) -> int:
    """`driftwarden baseline OP ... --collector ADDR` (the module docstring)."""
    out = out or sys.stdout
    err = err or sys.stderr
    operation = _OPERATIONS.get(args.op)
    if operation is None:
        raise UsageError(f"baseline {args.op} is not an operation on the collector's baselines; "
                         f"choose from {', '.join(OPERATIONS)}")
    try:
        return operation(args, _Output(args, out), err)
    except _CallFailed as failed:
        return failed.exit_code


__all__ = [
    "IMAGE_HELP",
    "OPERATIONS",
    "baseline_file_image",
    "image_reference",
    "list_baselines",
    "read_baseline_file",
    "required_reason",
    "run_baseline",
    "summary_fields",
    "write_file",
]
