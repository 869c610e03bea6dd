"""deploy/helm/driftwarden rendered by Helm's own template engine and linted by Helm's linter
(helm-python-sdk: Helm v4's Go library, bundled in the wheel; no cluster, no `helm` binary),
then checked as tests/test_deploy.py checks the plain manifests: the rendered agent's and
collector's args, with their volumes materialised from the Secrets scripts/k8s-secrets.sh makes
and the chart's ConfigMap, run through the real CLI parser and the commands' own validation;
the collector is started from its rendered config and health-checked with the agent Secret's
files under the name the rendered DaemonSet dials. The defaults render the same agent and
collector as deploy/daemonset.yaml and deploy/collector.yaml. Collector replicas on PostgreSQL
(collector.replicas, collector.store): rendered, and two collectors started from the rendered
args, the store URL taken from the Secret through the pod's env, on one real PostgreSQL.

Not covered here: installing the chart on a cluster (there is none), the kube-rbac-proxy
sidecar itself (its image cannot be pulled here).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from driftwarden.agent.command import options_from_args
from driftwarden.cli.main import build_parser
from driftwarden.collector.command import config_from_args
from driftwarden.collector.policy import load_policy
from driftwarden.collector.server import CollectorServer
from driftwarden.core.dial import dial
from driftwarden.ops.certs import CertBundle, init_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import missing_prerequisite
from tests.support.k8s import (
    DEPLOY,
    SERVICE_HOST,
    Pod,
    agent_options,
    cli_args,
    dockerfile,
    exec_form,
    expand,
    final_stage,
    find,
    load,
    load_text,
    only,
    pod_of,
    secrets_of,
)

CHART = DEPLOY / "helm" / "driftwarden"
RELEASE = NAMESPACE = "driftwarden"
NODES = ["node-a", "node-b.example"]
NODE = NODES[1]
AGENT, COLLECTOR = "driftwarden-agent", "driftwarden-collector"
HELM_PACKAGE = "helm-python-sdk==0.2.2"  # scripts/setup-host.sh installs it


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except ImportError as exc:
        missing_prerequisite(f"Helm's engine is not importable ({exc}): pip install "
                             f"{HELM_PACKAGE} (`make setup` does)")
    helm_python.disable_logging()
    return helm_python


def render(helm, values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """`helm template` of the chart: every rendered object."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    return [doc for template, text in sorted(rendered.items())
            if not template.endswith("NOTES.txt") for doc in load_text(text)]


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertBundle:
    return init_certs(tmp_path_factory.mktemp("pki") / "dw-certs", NODES, days=2,
                      collector_names=[SERVICE_HOST])


@pytest.fixture(scope="module")
def cluster(helm, bundle: CertBundle) -> list[dict[str, Any]]:
    """The script's Secrets, then the chart's defaults."""
    return [*secrets_of(bundle.directory), *render(helm)]


@pytest.fixture(scope="module")
def entrypoint() -> list[str]:
    return exec_form(final_stage(dockerfile()), "ENTRYPOINT")


def test_helm_lints_the_chart_clean(helm) -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # warnings or errors


def test_defaults_render_the_objects_of_the_plain_manifests(helm) -> None:
    docs = render(helm)
    assert kinds(docs) == [
        ("ConfigMap", f"{COLLECTOR}-policy"), ("DaemonSet", AGENT), ("Deployment", COLLECTOR),
        ("PersistentVolumeClaim", f"{COLLECTOR}-db"), ("Service", COLLECTOR),
        ("ServiceAccount", AGENT), ("ServiceAccount", COLLECTOR)]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    plain = [*load("daemonset.yaml"), *load("collector.yaml")]
    for kind, name in (("DaemonSet", AGENT), ("Deployment", COLLECTOR)):
        (_, chart_spec), (_, plain_spec) = pod_of(docs, kind, name), pod_of(plain, kind, name)
        chart_container, plain_container = only(chart_spec["containers"]), \
            only(plain_spec["containers"])
        for key in ("image", "args", "env", "securityContext", "resources", "volumeMounts",
                    "ports", "readinessProbe", "livenessProbe"):
            assert chart_container.get(key) == plain_container.get(key), (name, key)
        for key in ("hostPID", "tolerations", "priorityClassName", "securityContext",
                    "automountServiceAccountToken", "terminationGracePeriodSeconds"):
            assert chart_spec.get(key) == plain_spec.get(key), (name, key)
        # the same volumes, the policy ConfigMap under the chart's name
        chart_volumes = {v["name"]: v for v in chart_spec["volumes"]}
        for volume in plain_spec["volumes"]:
            if "configMap" in volume:
                assert chart_volumes[volume["name"]]["configMap"] == {
                    "name": f"{COLLECTOR}-policy"}
            else:
                assert chart_volumes[volume["name"]] == volume
        assert len(chart_volumes) == len(plain_spec["volumes"])
    # the policy is deploy/policy.example.yaml (files/policy.yaml links to it)
    policy = find(docs, "ConfigMap", f"{COLLECTOR}-policy")["data"]["policy.yaml"]
    assert policy == (DEPLOY / "policy.example.yaml").read_text()
    assert find(docs, "PersistentVolumeClaim", f"{COLLECTOR}-db")["spec"] == find(
        plain, "PersistentVolumeClaim", f"{COLLECTOR}-db")["spec"]
    assert find(docs, "Service", COLLECTOR)["spec"]["ports"] == find(
        plain, "Service", COLLECTOR)["spec"]["ports"]
    for account in (AGENT, COLLECTOR):
        assert find(docs, "ServiceAccount", account)["automountServiceAccountToken"] is False


def test_rendered_agent_args_pass_the_cli_and_the_agent_validation(
        cluster: list[dict[str, Any]], entrypoint: list[str], tmp_path: Path) -> None:
    pod, options, config = agent_options(cluster, AGENT, NODE, entrypoint, tmp_path)
    tls = pod.local("/etc/driftwarden/tls")
    assert (config.address, config.node) == (f"{SERVICE_HOST}:50051", NODE)
    assert (config.tls.cert, config.tls.key, config.tls.ca) == (
        tls / f"{NODE}.crt", tls / f"{NODE}.key", tls / "ca.crt")
    assert options.state_dir == str(pod.local("/var/lib/driftwarden"))
    assert options.runtime_endpoints == ()  # the usual sockets, found under the node's /run


def test_rendered_collector_serves_the_rendered_agent(
        cluster: list[dict[str, Any]], entrypoint: list[str], tmp_path: Path) -> None:
    """The collector from its rendered args (on loopback instead of the pod's addresses),
    dialled with the agent Secret's files under the name the rendered DaemonSet dials."""
    _, spec = pod_of(cluster, "Deployment", COLLECTOR)
    container = only(spec["containers"])
    pod = Pod(spec, container, cluster, tmp_path / "collector")
    config = config_from_args(build_parser().parse_args(
        pod.localise(cli_args(container, NODE, entrypoint))))
    assert config.policy == load_policy(pod.local("/etc/driftwarden/policy/policy.yaml"))
    assert config.db_path == pod.local("/var/lib/driftwarden/collector.db")
    assert config.listen_address[1] == only(container["ports"])["containerPort"]
    _, _, channel = agent_options(cluster, AGENT, NODE, entrypoint, tmp_path / "agent")
    dialled_host = channel.address.rpartition(":")[0]
    config = dataclasses.replace(config, listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    with CollectorServer(config) as server, dial(
            f"127.0.0.1:{server.port}", tls=channel.tls,
            options=[("grpc.ssl_target_name_override", dialled_host)]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=20)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_runtime_endpoints_are_args_and_their_folders_are_mounted(helm, entrypoint) -> None:
    endpoints = ["unix:///run/k3s/containerd/containerd.sock",
                 "unix:///var/snap/microk8s/common/run/containerd.sock",
                 "unix:///var/run/crio/crio.sock"]
    _, spec = pod_of(render(helm, {"agent": {"runtimeEndpoints": endpoints}}), "DaemonSet",
                     AGENT)
    container = only(spec["containers"])
    args = build_parser().parse_args(cli_args(container, NODE, entrypoint))
    assert options_from_args(args).runtime_endpoints == tuple(endpoints)
    # /run/... and /var/run/... are on the /run mount; the snap's folder gets its own
    extra = [m for m in container["volumeMounts"] if m["name"].startswith("runtime-")]
    assert extra == [{"name": "runtime-1", "mountPath": "/var/snap/microk8s/common/run",
                      "readOnly": True, "mountPropagation": "HostToContainer"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["runtime-1"]["hostPath"] == {"path": "/var/snap/microk8s/common/run",
                                                "type": "Directory"}
    with pytest.raises(helm.HelmError, match=re.escape("is not a unix socket; give unix:///path/to.sock")):
        render(helm, {"agent": {"runtimeEndpoints": ["tcp://10.0.0.1:2375"]}})


def test_metrics_proxy_scrape_annotations_and_minimal_rbac(helm) -> None:
    assert not [d for d in render(helm) if d["apiVersion"].startswith("rbac.")]
    docs = render(helm, {"metrics": {"enabled": True}})
    ports = {AGENT: 9475, COLLECTOR: 9474}
    for kind, name in (("DaemonSet", AGENT), ("Deployment", COLLECTOR)):
        workload, spec = pod_of(docs, kind, name)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(ports[name]),
            "prometheus.io/scheme": "https", "prometheus.io/path": "/metrics"}
        main, proxy = spec["containers"]
        assert proxy["name"] == "metrics-proxy"
        metrics = main["args"][main["args"].index("--metrics") + 1]
        assert f"--upstream=http://{metrics}/" in proxy["args"]
        assert f"--secure-listen-address=0.0.0.0:{ports[name]}" in proxy["args"]
        assert proxy["ports"] == [{"name": "metrics", "containerPort": ports[name],
                                   "protocol": "TCP"}]
        # the token is the proxy's alone
        assert spec["automountServiceAccountToken"] is False
        assert not [m for m in main["volumeMounts"] if m["name"] == "metrics-proxy-token"]
        assert [m["mountPath"] for m in proxy["volumeMounts"]] == [
            "/var/run/secrets/kubernetes.io/serviceaccount"]
    rbac = {(d["kind"], d["metadata"]["name"]): d for d in docs
            if d["apiVersion"].startswith("rbac.")}
    assert sorted(rbac) == [("ClusterRole", "driftwarden-metrics-auth"),
                            ("ClusterRole", "driftwarden-metrics-reader"),
                            ("ClusterRoleBinding", "driftwarden-metrics-auth")]
    assert rbac[("ClusterRole", "driftwarden-metrics-auth")]["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]}]
    assert rbac[("ClusterRole", "driftwarden-metrics-reader")]["rules"] == [
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    assert [s["name"] for s in rbac[("ClusterRoleBinding", "driftwarden-metrics-auth")]
            ["subjects"]] == [AGENT, COLLECTOR]


def test_openshift_scc_is_the_agents_only_right(helm) -> None:
    docs = render(helm, {"rbac": {"openshiftScc": "privileged"}})
    role = find(docs, "Role", "driftwarden-scc")
    assert role["rules"] == [{"apiGroups": ["security.openshift.io"],
                              "resources": ["securitycontextconstraints"],
                              "resourceNames": ["privileged"], "verbs": ["use"]}]
    binding = find(docs, "RoleBinding", "driftwarden-scc")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AGENT,
                                    "namespace": NAMESPACE}]


def test_tls_secrets_from_values_are_the_scripts(helm, bundle: CertBundle) -> None:
    values = {"tls": {
        "create": True, "ca": bundle.ca_cert.read_text(),
        "collector": {"crt": bundle.collector.cert.read_text(),
                      "key": bundle.collector.key.read_text()},
        "agents": {node: {"crt": pair.cert.read_text(), "key": pair.key.read_text()}
                   for node, pair in bundle.agents.items()}}}
    rendered = {d["metadata"]["name"]: d for d in render(helm, values) if d["kind"] == "Secret"}
    scripted = {d["metadata"]["name"]: d for d in secrets_of(bundle.directory)
                if d["kind"] == "Secret"}
    assert sorted(rendered) == sorted(scripted)
    for name, secret in scripted.items():
        decoded = {k: base64.b64decode(v) for k, v in rendered[name]["data"].items()}
        assert decoded == {k: base64.b64decode(v) for k, v in secret["data"].items()}, name
    with pytest.raises(helm.HelmError, match=re.escape("tls.create needs tls.ca")):
        render(helm, {"tls": {"create": True}})


def test_other_release_names_and_namespaces_are_consistent(helm, entrypoint) -> None:
    docs = render(helm, {"collector": {"port": 50443}}, name="dw", namespace="security")
    _, spec = pod_of(docs, "DaemonSet", "dw-driftwarden-agent")
    args = cli_args(only(spec["containers"]), NODE, entrypoint)
    service = find(docs, "Service", "dw-driftwarden-collector")
    assert args[args.index("--collector") + 1] == \
        "dw-driftwarden-collector.security.svc:50443"
    assert service["spec"]["ports"][0]["port"] == 50443
    _, collector = pod_of(docs, "Deployment", "dw-driftwarden-collector")
    assert only(only(collector["containers"])["ports"])["containerPort"] == 50443


def test_collector_replicas_other_than_one_are_refused_with_sqlite(helm) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(
            "collector.replicas must be 1 with the SQLite store (one file with a single "
            "writer); for several replicas give a PostgreSQL store: "
            "collector.store.existingSecret")):
        render(helm, {"collector": {"replicas": 2}})
    with pytest.raises(helm.HelmError, match=re.escape("collector.replicas must be at least 1")):
        render(helm, {"collector": {"replicas": 0, "store": {"existingSecret": STORE_SECRET}}})


STORE_SECRET = "driftwarden-store"
REPLICAS = {"collector": {"replicas": 3, "store": {"existingSecret": STORE_SECRET,
                                                   "passwordKey": "password"}}}


def store_secret(url: str) -> dict[str, Any]:
    """The Secret the operator makes for collector.store (the README's kubectl line)."""
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": STORE_SECRET, "namespace": NAMESPACE},
            "data": {"url": base64.b64encode(url.encode()).decode(),
                     "password": base64.b64encode(b"change-me").decode()}}


def secret_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """A container's env from Secrets (secretKeyRef), as the kubelet fills it."""
    env = {}
    for var in container.get("env", []):
        ref = var["valueFrom"]["secretKeyRef"]
        secret = find(objects, "Secret", ref["name"])
        env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def test_helm_lints_the_chart_with_collector_replicas_clean(helm) -> None:
    report = helm.lint(str(CHART), REPLICAS, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_collector_replicas_on_postgres_render_one_deployment_behind_the_service(
        helm, entrypoint) -> None:
    docs = render(helm, REPLICAS)
    assert kinds(docs) == [
        ("ConfigMap", f"{COLLECTOR}-policy"), ("DaemonSet", AGENT), ("Deployment", COLLECTOR),
        ("PodDisruptionBudget", COLLECTOR), ("Service", COLLECTOR),
        ("ServiceAccount", AGENT), ("ServiceAccount", COLLECTOR)]  # no PVC: no SQLite file
    deployment, spec = pod_of(docs, "Deployment", COLLECTOR)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = only(spec["containers"])
    assert container["env"] == [
        {"name": "DRIFTWARDEN_STORE",
         "valueFrom": {"secretKeyRef": {"name": STORE_SECRET, "key": "url"}}},
        {"name": "PGPASSWORD",
         "valueFrom": {"secretKeyRef": {"name": STORE_SECRET, "key": "password"}}}]
    # no SQLite volume: /var/lib/driftwarden is the pod's scratch space
    assert {"name": "db", "emptyDir": {}} in spec["volumes"]
    assert spec["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
         "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"app": COLLECTOR}}}]
    budget = find(docs, "PodDisruptionBudget", COLLECTOR)["spec"]
    assert budget["maxUnavailable"] == 1
    # one Service in front of every replica; the agents dial it
    for selector in (budget["selector"]["matchLabels"],
                     find(docs, "Service", COLLECTOR)["spec"]["selector"]):
        assert selector.items() <= pod_labels.items()
    _, agent_spec = pod_of(docs, "DaemonSet", AGENT)
    agent_args = cli_args(only(agent_spec["containers"]), NODE, entrypoint)
    assert agent_args[agent_args.index("--collector") + 1] == f"{SERVICE_HOST}:50051"


def test_rendered_collector_replicas_run_on_one_postgresql_database(
        helm, bundle: CertBundle, entrypoint, postgres, tmp_path: Path) -> None:
    """Two collectors from the rendered replicas' args, the store URL from the Secret through
    the pod's env, on one real PostgreSQL database: both serve the agents' TLS files."""
    with postgres.database() as url:
        objects = [*secrets_of(bundle.directory), store_secret(url), *render(helm, REPLICAS)]
        _, spec = pod_of(objects, "Deployment", COLLECTOR)
        container = only(spec["containers"])
        env = secret_env(container, objects)
        assert env == {"DRIFTWARDEN_STORE": url, "PGPASSWORD": "change-me"}
        words = [expand(word, env) for word in container["args"]]
        assert words[words.index("--store") + 1] == url
        _, _, channel = agent_options(objects, AGENT, NODE, entrypoint, tmp_path / "agent")
        dialled_host = channel.address.rpartition(":")[0]
        servers = []
        try:
            for replica in ("a", "b"):
                pod = Pod(spec, container, objects, tmp_path / replica)
                config = config_from_args(build_parser().parse_args(pod.localise(words)))
                assert (config.db_path, config.store_url) == (None, url)
                servers.append(CollectorServer(dataclasses.replace(
                    config, listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")).start())
            for server in servers:
                with dial(f"127.0.0.1:{server.port}", tls=channel.tls,
                          options=[("grpc.ssl_target_name_override", dialled_host)]) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=20)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for server in servers:
                server.stop()


def test_setup_installs_the_helm_engine_this_test_names() -> None:
    setup = (DEPLOY.parent / "scripts" / "setup-host.sh").read_text()
    assert f'HELM_SDK="{HELM_PACKAGE}"' in setup


def test_chart_policy_file_is_the_example_policy() -> None:
    link = CHART / "files" / "policy.yaml"
    assert link.is_symlink() and link.resolve() == (DEPLOY / "policy.example.yaml").resolve()
    assert os.readlink(link) == "../../../policy.example.yaml"
