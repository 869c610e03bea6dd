"""The collector's filter language: one table of cases through the store's SQL (on a real SQLite
file and a real PostgreSQL server), AlertFilter.matches and the subscribers'
SubscriberFilter.matches; bad filters; page tokens."""

from __future__ import annotations

import contextlib

import pytest
from driftwarden.collector.fanout import SubscriberFilter
from driftwarden.collector.filters import (
    AlertFilter,
    decode_page_token,
    encode_page_token,
    image_repository,
)
from driftwarden.collector.store import AlertStore
from driftwarden.core.alerts import AlertKind, Severity

from tests.support.store_alerts import CID_API, CID_CACHE, CID_JOB, CID_WEB, make_alert


def ids(alerts: list[dict]) -> list[str]:
    return [a["id"] for a in alerts]


# -- filters: one table, three matchers ------------------------------------------------------------

A1 = make_alert("a1", 100.0, kind=AlertKind.DRIFT, severity=Severity.HIGH, node="node-1",
                cid=CID_WEB, name="web", image="nginx:1.25", image_id="sha256:" + "aa" * 32,
                namespace="prod")
A2 = make_alert("a2", 200.0, kind=AlertKind.NOVEL, severity=Severity.LOW, node="node-1",
                cid=CID_API, name="api", image="nginx:1.26", image_id="sha256:" + "bb" * 32,
                namespace="prod")
A3 = make_alert("a3", 300.0, kind=AlertKind.ANOMALY, severity=Severity.MEDIUM, node="node-2",
                cid=CID_CACHE, name="cache", image="redis:7", image_id="sha256:" + "cc" * 32,
                namespace="dev")
A4 = make_alert("a4", 400.0, kind=AlertKind.DRIFT, severity=Severity.CRITICAL, node="node-2",
                cid=CID_JOB, name="job", image="reg.local:5000/tools/sh:1.0@sha256:" + "ee" * 32,
                image_id="sha256:" + "dd" * 32, namespace=None)
A5 = make_alert("a5", 500.0, kind=AlertKind.NOVEL, severity=Severity.MEDIUM, node="node-3",
                cid=None, name=None, image=None, image_id=None, namespace=None)
# upper-case ids, a name that looks like an id prefix, empty texts (as unknown as null)
A6 = make_alert("a6", 600.0, kind=AlertKind.ANOMALY, severity=Severity.HIGH, node="node-3",
                cid="DEADBEEF" + "0" * 56, name="0123", image="",
                image_id="SHA256:" + "EF" * 32, namespace="")
# a container id that is not hex, an image by digest, an image id without "sha256:"
A7 = make_alert("a7", 700.0, kind=AlertKind.DRIFT, severity=Severity.LOW, node="node-1",
                cid="web-canary-1", name="web-canary", image="nginx@sha256:" + "12" * 32,
                image_id="3f1c" * 16, namespace="kube-system")
FILTER_SET = [A1, A2, A3, A4, A5, A6, A7]
ALL = ["a7", "a6", "a5", "a4", "a3", "a2", "a1"]

# Arguments both AlertFilter and SubscriberFilter take, and the alerts they select.
SHARED_CASES = [
    ({}, ALL),
    ({"kinds": ["DRIFT"]}, ["a7", "a4", "a1"]),  # any case
    ({"kinds": "novel"}, ["a5", "a2"]),  # a lone string is one term
    ({"min_severity": "high"}, ["a6", "a4", "a1"]),
    ({"min_severity": Severity.CRITICAL}, ["a4"]),
    ({"min_severity": 2}, ["a6", "a5", "a4", "a3", "a1"]),
    ({"nodes": ["node-2", "node-3"]}, ["a6", "a5", "a4", "a3"]),
    ({"namespaces": ["prod"]}, ["a2", "a1"]),
    ({"exclude_namespaces": ["prod", "kube-system"]}, ["a6", "a5", "a4", "a3"]),  # unknown kept
    ({"images": ["nginx"]}, ["a7", "a2", "a1"]),  # the repository: every tag and digest
    ({"images": ["nginx:1.25"]}, ["a1"]),
    ({"images": ["bb" * 32]}, ["a2"]),  # an image id without sha256:
    ({"images": ["sha256:" + "cc" * 32]}, ["a3"]),
    ({"images": ["reg.local:5000/tools/sh"]}, ["a4"]),
    ({"images": ["efef"]}, ["a6"]),  # an id prefix; the stored id is upper case
    ({"images": ["SHA256:3F1C"]}, ["a7"]),  # the stored id has no sha256:
    ({"images": ["sha256:3f1"]}, []),  # 3 hex digits: no prefix
    ({"exclude_images": ["nginx", "redis:7"]}, ["a6", "a5", "a4"]),
    ({"containers": ["web"]}, ["a1"]),  # a name, exactly
    ({"containers": [" web "]}, ["a1"]),  # terms are stripped
    ({"containers": [CID_API]}, ["a2"]),
    ({"containers": ["aaaa"]}, ["a4", "a1"]),  # an id prefix
    ({"containers": ["AAAA1111"]}, ["a1"]),  # case ignored
    ({"containers": ["aaa"]}, []),  # shorter than MIN_ID_PREFIX
    ({"containers": ["deadbeef"]}, ["a6"]),
    ({"containers": ["0123"]}, ["a6"]),  # the name (no id starts with it)
    ({"containers": ["web-canary-1"]}, ["a7"]),  # a full id that is not hex
    ({"containers": ["web-"]}, []),  # not hex: a name, never a prefix
    ({"exclude_containers": ["aaaa", "cache"]}, ["a7", "a6", "a5", "a2"]),
    ({"kinds": ["drift"], "min_severity": "critical", "nodes": ["node-2"]}, ["a4"]),
    ({"namespaces": ["prod"], "exclude_containers": ["web"]}, ["a2"]),
    ({"images": ["nginx"], "exclude_images": ["nginx:1.26"], "containers": ["web", "aaaa4444"]},
     ["a1"]),
]
# Conditions only the store's AlertFilter has (Alerts.List), checked in SQL and in Python.
STORE_CASES = [
    ({"exclude_kinds": ["drift", "novel"]}, ["a6", "a3"]),
    ({"exclude_nodes": ["node-1", "node-2"]}, ["a6", "a5"]),
    ({"since": 200.0, "until": 400.0}, ["a3", "a2"]),  # since inclusive, until exclusive
    ({"since": 600.0}, ["a7", "a6"]),
    ({"until": 100.0}, []),
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filter_store(request, tmp_path_factory):
    """The filter set in a store of each backend: the SQL reads the same on both."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            s = AlertStore.open(tmp_path_factory.mktemp("filters") / "collector.db")
        else:
            from driftwarden.collector.store_pg import PostgresStore

            url = stack.enter_context(request.getfixturevalue("postgres").database())
            s = PostgresStore.open(url)
        with s:
            s.insert_alerts(FILTER_SET)
            yield s


def selected(filter_store: AlertStore, kwargs: dict, subscriber: bool) -> dict:
    alert_filter = AlertFilter(**kwargs)
    listed, token = filter_store.list_alerts(alert_filter)
    assert token is None
    stored = [filter_store.get_alert(i) for i in ALL]  # what the hub is given, newest first
    out = {"sql": ids(listed), "count": filter_store.count_alerts(alert_filter),
           "python": [a["id"] for a in stored if alert_filter.matches(a)]}
    if subscriber:
        subscription = SubscriberFilter(**kwargs)
        out["subscriber"] = [a["id"] for a in stored if subscription.matches(a)]
    return out


@pytest.mark.parametrize(("kwargs", "expected"), SHARED_CASES)
def test_subscribers_and_listings_select_the_same_alerts(filter_store, kwargs, expected):
    assert selected(filter_store, kwargs, subscriber=True) == {
        "sql": expected, "count": len(expected), "python": expected, "subscriber": expected}


@pytest.mark.parametrize(("kwargs", "expected"), STORE_CASES)
def test_store_only_conditions_agree_in_sql_and_python(filter_store, kwargs, expected):
    assert selected(filter_store, kwargs, subscriber=False) == {
        "sql": expected, "count": len(expected), "python": expected}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kinds": ("drift", "weird")}, "kinds[1]: unknown kind 'weird'; allowed: drift, novel, "
                                    "anomaly"),
    ({"min_severity": "huge"}, "min_severity: unknown severity 'huge'; allowed: low, medium, "
                               "high, critical"),
    ({"min_severity": 9}, "min_severity: 9 is not 1..4 (low..critical)"),
    ({"min_severity": 2.5}, "min_severity: 2.5 is not a severity"),
    ({"nodes": ("",)}, "nodes[0]: empty value; leave the list empty to match any"),
    ({"containers": ("web", 7)}, "containers[1]: must be a string, got int"),
    ({"since": 10.0, "until": 5.0}, "since (10.0) is after until (5.0)"),
    ({"since": "yesterday"}, "since must be seconds since the epoch, got 'yesterday'"),
])
def test_bad_filters_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError) as info:
        AlertFilter(**kwargs)
    assert str(info.value) == message


def test_image_repository():
    assert image_repository("nginx:1.25") == "nginx"
    assert image_repository("nginx") == "nginx"
    assert image_repository("reg:5000/a/b") == "reg:5000/a/b"
    assert image_repository("reg:5000/a/b:2@sha256:ff") == "reg:5000/a/b"


# -- page tokens ---------------------------------------------------------------------------------


def test_a_page_token_gives_back_its_cursor_only_for_its_filter():
    fingerprint = AlertFilter(nodes=("node-1",)).fingerprint()
    token = encode_page_token(1000.5, "a1", fingerprint)
    assert token.startswith("v1.")
    assert decode_page_token(token, fingerprint) == (1000.5, "a1")
    assert AlertFilter(nodes=("node-1",)).fingerprint() == fingerprint
    with pytest.raises(ValueError, match="belongs to a listing with another filter"):
        decode_page_token(token, AlertFilter().fingerprint())


@pytest.mark.parametrize("token", [None, 7, "garbage", "v1.", "v1.!!!!", "v2.eyJ0IjoxfQ",
                                   "v1.eyJ0IjoxfQ", "v1.bnVsbA"])
def test_bad_page_tokens_say_what_to_do(token):
    with pytest.raises(ValueError, match=r"^invalid page token: pass back exactly the "
                                         "next_page_token of the previous page"):
        decode_page_token(token, AlertFilter().fingerprint())


def test_a_token_with_a_time_that_is_not_a_finite_number_is_refused():
    fingerprint = AlertFilter().fingerprint()
    for when in (float("nan"), True, "1"):
        token = encode_page_token(when, "a1", fingerprint)
        with pytest.raises(ValueError, match="invalid page token"):
            decode_page_token(token, fingerprint)
