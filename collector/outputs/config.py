"""The outputs file (``driftwarden collector --outputs FILE``): YAML (or JSON, which YAML reads).

::

    outputs:
      - type: webhook                     # webhook | syslog | jsonfile
        name: siem                        # optional: the metrics' output label (default: type)
        filter: {kinds: [drift], min_severity: high}  # the subscribe filter language
        queue: 10000                      # alerts it may fall behind before dropping
        retry: {attempts: 5, backoff: 0.5, max_backoff: 30}
        url: https://siem.example:8088/hook
        ...                               # the kind's own keys (see its module)

``filter`` takes the fields of :class:`~driftwarden.collector.filters.AlertFilter` (kinds,
min_severity, nodes, namespaces, images, containers, and exclude_kinds, exclude_nodes,
exclude_namespaces, exclude_images, exclude_containers); a value is one term or a list.
Every mistake is one UsageError naming the file, the output and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from driftwarden.collector.filters import AlertFilter
from driftwarden.collector.outputs.base import Fields, OutputConfig, RetryPolicy, SinkConfig
from driftwarden.collector.outputs.jsonfile import JsonFileConfig
from driftwarden.collector.outputs.syslog import SyslogConfig
from driftwarden.collector.outputs.webhook import WebhookConfig
from driftwarden.core.errors import UsageError

KINDS: dict[str, type[SinkConfig]] = {
    c.type: c for c in (WebhookConfig, SyslogConfig, JsonFileConfig)}
FILTER_KEYS = tuple(f.name for f in dataclasses.fields(AlertFilter)
                    if f.init and f.name not in ("since", "until"))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_EXAMPLE = "outputs:\n  - type: jsonfile\n    path: /var/log/driftwarden/alerts.jsonl"


def load_outputs(path: str | os.PathLike[str], flag: str = "--outputs") -> tuple[OutputConfig, ...]:
    """The outputs in the file at `path` (module docstring); UsageError naming what is wrong."""
    where = f"{flag} {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UsageError(f"{where}: not valid YAML or JSON{at}: {problem}") from None
    return parse_outputs(doc, where)


def parse_outputs(doc: Any, where: str = "outputs file") -> tuple[OutputConfig, ...]:
    """The outputs of a parsed document ``{"outputs": [...]}``."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("outputs"), list):
        raise UsageError(f"{where}: expected a mapping with a list 'outputs', for example\n"
                         f"{_EXAMPLE}")
    top = Fields(doc, where)
    top.raw("outputs")
    top.done()
    outputs = tuple(parse_output(item, f"{where}: outputs[{i}]")
                    for i, item in enumerate(doc["outputs"]))
    if not outputs:
        raise UsageError(f"{where}: the list 'outputs' is empty; list at least one output or "
                         "leave --outputs out")
    seen: dict[str, int] = {}
    for i, output in enumerate(outputs):
        if output.name in seen:
            raise UsageError(f"{where}: outputs[{i}] and outputs[{seen[output.name]}] are both "
                             f"named {output.name!r}; give each a distinct 'name'")
        seen[output.name] = i
    return outputs


def parse_output(item: Any, where: str) -> OutputConfig:
    if not isinstance(item, Mapping):
        raise UsageError(f"{where}: must be a mapping with a 'type' ({', '.join(KINDS)}), "
                         f"got {item!r}")
    fields = Fields(item, where)
    kind = fields.text("type", choices=tuple(KINDS))
    name = fields.text("name", kind)
    if not _NAME.match(name):
        raise fields.error("name", f"{name!r}: use letters, digits, '.', '_' and '-' (up to 63)")
    fields.where = f"{where} ({kind} {name})"
    alert_filter = _filter(fields.mapping("filter"))
    queue = fields.number("queue", OutputConfig.queue, minimum=1, maximum=10_000_000,
                          integer=True)
    flush = fields.number("flush_seconds", OutputConfig.flush_seconds, minimum=0, maximum=600)
    retry_fields = fields.mapping("retry")
    default = RetryPolicy()
    retry = RetryPolicy(
        attempts=retry_fields.number("attempts", default.attempts, minimum=1, maximum=1000,
                                     integer=True),
        backoff=retry_fields.number("backoff", default.backoff, minimum=0, maximum=3600),
        max_backoff=retry_fields.number("max_backoff", default.max_backoff, minimum=0,
                                        maximum=86400))
    retry_fields.done()
    sink = KINDS[kind].parse(fields)
    fields.done()
    return OutputConfig(name=name, sink=sink, filter=alert_filter, queue=queue, retry=retry,
                        flush_seconds=float(flush))


def _filter(fields: Fields) -> AlertFilter:
    args = {}
    for key in FILTER_KEYS:
        value = fields.raw(key, None)
        if value is not None:
            args[key] = value
    fields.done()
    try:
        return AlertFilter(**args)
    except ValueError as exc:
        raise fields.error(None, str(exc)) from None


__all__ = ["FILTER_KEYS", "KINDS", "load_outputs", "parse_output", "parse_outputs"]
