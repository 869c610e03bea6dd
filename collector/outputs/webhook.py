"""The webhook output: each alert (or a batch) as a JSON POST, signed with HMAC-SHA256.

Keys in the outputs file (besides the common ones, see ``config``)::

    url: https://hooks.example/driftwarden     # http:// or https://
    secret_file: /etc/driftwarden/webhook.key  # optional: sign every body with this secret
    headers: {Authorization: "Splunk <token>"}  # optional: extra request headers
    timeout: 5                                 # seconds to connect, and to wait for an answer
    batch: 1                                   # alerts per POST (1: the body is one alert)
    format: json                               # json | splunk-hec
    ca_file: /etc/driftwarden/siem-ca.pem      # optional: the CA of an https:// receiver

Bodies
    ``json``: with ``batch: 1`` the alert's JSON object (the shape ``driftwarden alerts
    --json`` prints: ``Alert.to_dict()`` plus ``node``); with a larger batch a JSON array of
    1..batch alerts. ``splunk-hec``: one HEC event object per alert (``time``, ``host`` = the
    node, ``source``, ``sourcetype: driftwarden:alert``, ``event`` = the alert), concatenated
    with newlines as Splunk's ``/services/collector/event`` endpoint takes them.

Signature
    With ``secret_file``, the header ``X-Driftwarden-Signature: sha256=<hex>`` is the
    HMAC-SHA256 of the exact body bytes with the file's content (trailing white space
    stripped) as the key. Receivers recompute it over the raw body and compare in constant
    time (``hmac.compare_digest``).

Answers
    2xx: delivered. 408, 429 and 5xx, timeouts and connection errors: retried with backoff.
    Any other status (a 4xx, a redirect) is not retried: the alerts are dropped and counted
    (``gave_up``) with the status in the log. The environment's proxy variables and
    ``.netrc`` are not used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import requests
from driftwarden.collector.outputs.base import Fields, Sink, SinkConfig
from driftwarden.core.errors import OutputError

SIGNATURE_HEADER = "X-Driftwarden-Signature"
FORMATS = ("json", "splunk-hec")
USER_AGENT = "driftwarden-collector"
_RETRY_STATUSES = frozenset({408, 429})


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for `body`: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def encode_body(alerts: Sequence[Mapping[str, Any]], *, batch: int, format: str) -> bytes:
    """The POST body for `alerts` (module docstring). ASCII JSON: text from containers is
    escaped, never raw."""
    if format == "splunk-hec":
        return "\n".join(json.dumps({
            "time": alert.get("time"), "host": alert.get("node") or None,
            "source": "driftwarden", "sourcetype": "driftwarden:alert", "event": alert,
        }, separators=(",", ":")) for alert in alerts).encode("ascii")
    doc: Any = alerts[0] if batch == 1 else list(alerts)
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class WebhookConfig(SinkConfig):
    type = "webhook"

    url: str
    secret: bytes | None = field(default=None, repr=False)
    secret_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 5.0
    batch: int = 1
    format: str = "json"
    ca_file: str | None = None

    @classmethod
    def parse(cls, fields: Fields) -> Self:
        url = fields.text("url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fields.error("url", f"{url!r} is not an http:// or https:// URL with a host")
        secret_file = fields.text("secret_file", None)
        secret = _read_secret(fields, secret_file) if secret_file else None
        headers = []
        header_fields = fields.mapping("headers")
        for name in header_fields.data:
            value = header_fields.raw(name)
            if not isinstance(name, str) or not _token(name):
                raise header_fields.error(str(name), "not a valid header name (letters, digits "
                                                     "and !#$%&'*+-.^_`|~)")
            if not isinstance(value, str | int) or any(c in str(value) for c in "\r\n\0"):
                raise header_fields.error(name, "the value must be one line of text")
            if name.lower() == SIGNATURE_HEADER.lower():
                raise header_fields.error(name, "is set by the output itself (secret_file)")
            headers.append((name, str(value)))
        ca_file = fields.text("ca_file", None)
        if ca_file is not None and not os.path.isfile(ca_file):
            raise fields.error("ca_file", f"{ca_file}: no such file")
        return cls(url=url, secret=secret, secret_file=secret_file, headers=tuple(headers),
                   timeout=float(fields.number("timeout", 5.0, minimum=0.1, maximum=300)),
                   batch=fields.number("batch", 1, minimum=1, maximum=10_000, integer=True),
                   format=fields.text("format", "json", choices=FORMATS), ca_file=ca_file)

    def make_sink(self) -> WebhookSink:
        return WebhookSink(self)

    def describe(self) -> str:
        parts = urlsplit(self.url)
        signed = "signed" if self.secret else "unsigned"
        return (f"POST {parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path} "
                f"({self.format}, {signed}, batch {self.batch})")


def _token(name: str) -> bool:
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~")
                              for c in name)


def _read_secret(fields: Fields, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read().rstrip()
    except OSError as exc:
        raise fields.error("secret_file", f"{path}: cannot read it ({exc.strerror})") from None
    if not secret:
        raise fields.error("secret_file", f"{path}: the file is empty; put the shared secret "
                                          "in it")
    return secret


class WebhookSink(Sink):
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.max_batch = config.batch
        self._session: requests.Session | None = None
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                         **dict(config.headers)}

    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        config = self.config
        body = encode_body(alerts, batch=config.batch, format=config.format)
        headers = dict(self._headers)
        if config.secret is not None:
            headers[SIGNATURE_HEADER] = sign(config.secret, body)
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no proxy variables, no .netrc credentials
        try:
            response = self._session.post(
                config.url, data=body, headers=headers, timeout=config.timeout,
                allow_redirects=False, verify=config.ca_file or True)
        except requests.RequestException as exc:
            self._reset()  # a broken keep-alive connection is not reused
            raise OutputError(f"POST failed: {_why(exc)}") from None
        with response:
            status = response.status_code
            if 200 <= status < 300:
                return
            text = response.reason or ""
        retryable = status in _RETRY_STATUSES or status >= 500
        hint = "" if retryable else " (not retried: fix the receiver or the output's settings)"
        raise OutputError(f"the receiver answered {status} {text}{hint}", retryable=retryable)

    def _reset(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def close(self) -> None:
        self._reset()


def _why(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        hint = ("; give ca_file the CA that signed the receiver's certificate"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) else "")
        return f"TLS failed ({str(exc)[:200]}){hint}"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed (" + (str(exc.args[0]) if exc.args else "no details")[:200] \
            + ")"
    return f"{type(exc).__name__}: {exc}"[:300]


__all__ = ["FORMATS", "SIGNATURE_HEADER", "WebhookConfig", "WebhookSink", "encode_body", "sign"]
