"""Alerts as the collector's store keeps them (``Alert.to_dict()`` plus ``"node"``), for the
store's and the filter language's tests."""

from __future__ import annotations

from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity

CID_WEB = "aaaa1111" * 8
CID_API = "bbbb2222" * 8
CID_CACHE = "cccc3333" * 8
CID_JOB = "aaaa4444" * 8


def make_alert(alert_id: str, when: float = 1000.0, *, kind: AlertKind = AlertKind.DRIFT,
               severity: Severity = Severity.HIGH, node: str = "node-1",
               cid: str | None = CID_WEB, name: str | None = "web",
               image: str | None = "nginx:1.25", image_id: str | None = "sha256:" + "ab" * 32,
               namespace: str | None = "prod", count: int = 1, first_seen: float | None = None,
               last_seen: float | None = None, text: str = "ran /tmp/x") -> dict:
    alert = Alert(
        id=alert_id, time=when, kind=kind, severity=severity, score=1.0,
        reasons=(AlertReason("exec-added-binary", text, (("path", "/tmp/x"),)),),
        container={"id": cid, "name": name, "image": image, "image_id": image_id,
                   "pod": "pod-0", "namespace": namespace},
        process={"pid": 42, "ppid": 1, "exe": "/tmp/x", "argv": ["x"], "uid": 0, "comm": "x"},
        events=({"kind": "exec", "path": "/tmp/x"},), baseline_version=3,
        count=count, first_seen=first_seen, last_seen=last_seen)
    return {**alert.to_dict(), "node": node}
