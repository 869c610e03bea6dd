"""deploy/: the image and the Kubernetes manifests, checked without a cluster or a registry.

Every deploy/*.yaml is parsed. The agent's and the collector's container args are expanded the
way the kubelet does ($(NODE_NAME) from the downward API), run through the real CLI parser
(driftwarden.cli.main.build_parser) and the commands' own validation (agent_cmd.options_from_args +
channel_config, collector_cmd.config_from_args), with the pod's volumes materialised in tmp_path
from the objects that fill them: the Secrets that scripts/k8s-secrets.sh makes from a real
`certs init` directory, the policy ConfigMap, empty dirs for the PVC and host paths. The
collector is then started from its config on loopback and health-checked with the agent
Secret's files under the name the DaemonSet dials.

Not covered here: the kubelet and API server themselves (scheduling, DNS, PVC provisioning,
fsGroup ownership). tests/test_image.py builds deploy/Dockerfile and runs the image as these
manifests run it; tests/test_helm.py renders the Helm chart.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driftwarden.agent.command import channel_config, options_from_args
from driftwarden.cli.main import build_parser
from driftwarden.collector.command import config_from_args
from driftwarden.collector.policy import load_policy
from driftwarden.collector.server import CollectorServer
from driftwarden.core.dial import dial
from driftwarden.core.errors import UsageError
from driftwarden.core.netaddr import is_loopback, parse_metrics_address
from driftwarden.core.tls import certificate_identity
from driftwarden.ops.certs import CertBundle, init_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.k8s import (
    DEPLOY,
    ENTRYPOINT_WRAPPER,
    NAMESPACE,
    SERVICE_HOST,
    Pod,
    agent_options,
    cli_args,
    container_env,
    dockerfile,
    exec_form,
    final_stage,
    find,
    load,
    only,
    pod_of,
    run_secrets_script,
    secrets_of,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "k8s-secrets.sh"
MANIFESTS = ("daemonset.yaml", "collector.yaml")
NODES = ["node-a", "node-b.example"]
NODE = NODES[1]  # the node the pod under test is scheduled on


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertBundle:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install openssl)")
    return init_certs(tmp_path_factory.mktemp("pki") / "dw-certs", NODES, days=2,
                      collector_names=[SERVICE_HOST])


run_script = run_secrets_script


@pytest.fixture(scope="module")
def secrets(bundle: CertBundle) -> list[dict[str, Any]]:
    return secrets_of(bundle.directory)


@pytest.fixture(scope="module")
def cluster(secrets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object the README applies: the script's output, then the manifests."""
    return [*secrets, *(doc for name in MANIFESTS for doc in load(name))]


@pytest.fixture(scope="module")
def entrypoint() -> list[str]:
    return exec_form(final_stage(dockerfile()), "ENTRYPOINT")


# -- every file ---------------------------------------------------------------------------------


def test_every_deploy_yaml_parses_and_is_known() -> None:
    names = sorted(p.name for p in DEPLOY.glob("*.yaml"))
    # a new manifest must be added to MANIFESTS (and so to these tests)
    assert names == sorted([*MANIFESTS, "policy.example.yaml"])
    kinds = {}
    for name in MANIFESTS:
        docs = load(name)
        for doc in docs:
            assert set(doc) >= {"apiVersion", "kind", "metadata"}, (name, doc)
            if doc["kind"] == "Namespace":
                assert doc == {"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": NAMESPACE}}
            else:
                assert doc["metadata"]["namespace"] == NAMESPACE, (name, doc["metadata"])
        kinds[name] = [d["kind"] for d in docs]
    assert kinds == {"daemonset.yaml": ["Namespace", "DaemonSet"],
                     "collector.yaml": ["Namespace", "ConfigMap", "PersistentVolumeClaim",
                                        "Deployment", "Service"]}
    assert isinstance(load("policy.example.yaml")[0]["rules"], list)


def test_dockerfile_copies_every_package_dir_and_runs_the_cli(entrypoint: list[str]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"driftwarden": "."}  # import name = place on disk
    instructions = dockerfile()
    stages = [rest.split() for word, rest in instructions if word == "FROM"]
    # runtime (Debian, bcc, headers) < deps (Python packages) < wheel (the project) ; the image
    assert stages == [["debian:bookworm-slim", "AS", "runtime"], ["runtime", "AS", "deps"],
                      ["deps", "AS", "wheel"], ["deps"]]
    copies = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    copied_as_is = {src.rstrip("/") for *srcs, dst in copies for src in srcs
                    if len(srcs) == 1 and src.rstrip("/") == dst.rstrip("/")}
    for package in setuptools["packages"]:
        if package == "driftwarden":
            continue
        top = package.split(".")[1]
        assert top in copied_as_is, f"{package} is not copied to ./{top}"
    assert {"core", "agent", "probes", "models", "collector", "ops", "cli", "proto"} \
        <= copied_as_is
    # `pip wheel .` needs the project files, and `python -m driftwarden` the root's __main__
    assert ["pyproject.toml", "README.md", "__main__.py", "./"] in copies
    steps = [word for word, _ in instructions]
    last_source_copy = max(i for i, (w, rest) in enumerate(instructions)
                           if w == "COPY" and "--from" not in rest and "deploy/" not in rest)
    wheel = next(i for i, (w, rest) in enumerate(instructions)
                 if w == "RUN" and "pip wheel" in rest)
    assert wheel > last_source_copy, "the wheel is built before every package is copied"
    assert steps.index("FROM", wheel) == max(i for i, w in enumerate(steps) if w == "FROM")
    # the image runs the project's one script, through deploy/entrypoint.sh
    assert entrypoint == [ENTRYPOINT_WRAPPER]
    assert ["deploy/entrypoint.sh", ENTRYPOINT_WRAPPER] in copies
    script = (DEPLOY / "entrypoint.sh").read_text()
    assert script.rstrip().endswith('exec driftwarden "$@"')
    assert list(pyproject["project"]["scripts"]) == ["driftwarden"]
    assert (DEPLOY / "entrypoint.sh").stat().st_mode & 0o111, "entrypoint.sh must be executable"

    cmd = exec_form(final_stage(instructions), "CMD")
    args = build_parser().parse_args(cmd)
    assert args.command == "agent"
    options = options_from_args(args)
    assert channel_config(options) is None  # no collector: alerts as JSON lines on stdout
    assert options.alerts_file == "-"


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    """The build context is the repository root; .dockerignore sends only what is copied (a
    COPY of a path it leaves out fails the build)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {src.rstrip("/") for word, rest in dockerfile() if word == "COPY"
               and "--from" not in rest for src in shlex.split(rest)[:-1]}
    assert sources - allowed == set()  # each would fail the build
    assert allowed - sources == set()  # nothing else is sent


def test_dockerfile_and_setup_install_the_same_cri_stubs() -> None:
    """The CRI stubs are outside pyproject.toml (installed with --no-deps): the image and the
    development host must take the same version."""
    pin = re.compile(r"container-runtime-interface-api==([0-9.]+)")
    in_image = pin.findall((DEPLOY / "Dockerfile").read_text())
    on_host = pin.findall((REPO / "scripts" / "setup-host.sh").read_text())
    assert len(set(in_image)) == 1 and set(in_image) == set(on_host), (in_image, on_host)


def test_policy_configmap_is_the_example_policy(tmp_path: Path) -> None:
    configmap = find(load("collector.yaml"), "ConfigMap", "driftwarden-policy")
    example = (DEPLOY / "policy.example.yaml").read_text()
    assert configmap["data"] == {"policy.yaml": example}
    path = tmp_path / "policy.yaml"
    path.write_text(configmap["data"]["policy.yaml"])
    assert [rule.name for rule in load_policy(path).rules] == [
        "hands-off-payments-db", "freeze-edge-critical", "quarantine-protect-drift",
        "pause-protect-anomaly"]


# -- the Secrets script -------------------------------------------------------------------------


def test_secrets_script_makes_the_two_secrets(bundle: CertBundle,
                                              secrets: list[dict[str, Any]]) -> None:
    assert [(d["kind"], d["metadata"]["name"]) for d in secrets] == [
        ("Namespace", NAMESPACE), ("Secret", "driftwarden-collector-tls"),
        ("Secret", "driftwarden-agent-tls")]
    collector = {k: base64.b64decode(v) for k, v in secrets[1]["data"].items()}
    agent = {k: base64.b64decode(v) for k, v in secrets[2]["data"].items()}
    assert collector == {"ca.crt": bundle.ca_cert.read_bytes(),
                         "collector.crt": bundle.collector.cert.read_bytes(),
                         "collector.key": bundle.collector.key.read_bytes()}
    expected = {"ca.crt": bundle.ca_cert.read_bytes()}
    for node, pair in bundle.agents.items():
        expected[f"{node}.crt"] = pair.cert.read_bytes()
        expected[f"{node}.key"] = pair.key.read_bytes()
    assert agent == expected
    for doc in secrets[1:]:
        assert doc["metadata"]["namespace"] == NAMESPACE and doc["type"] == "Opaque"
    secret_values = {v for doc in secrets[1:] for v in doc["data"].values()}
    for private in (bundle.ca_key, bundle.operator.key, bundle.operator_token):
        assert base64.b64encode(private.read_bytes()).decode() not in secret_values


def test_manifests_mount_exactly_the_secrets_the_script_makes(
        secrets: list[dict[str, Any]]) -> None:
    mounted = {v["secret"]["secretName"]
               for name in MANIFESTS for doc in load(name) if "template" in doc.get("spec", {})
               for v in doc["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert mounted == {d["metadata"]["name"] for d in secrets if d["kind"] == "Secret"}


@pytest.mark.parametrize(("change", "message"), [
    ("no-san", f"collector.crt does not name {SERVICE_HOST}, which the agents dial; remake it"),
    ("node-ca", "a node named 'ca' would collide with the CA's key ca.crt in the Secret"),
    ("no-agents", "agents has no agent certificates; run `driftwarden certs init"),
    ("no-key", "agents/node-a.crt has no key"),
    ("no-collector-key", "collector.key is missing; is"),
    ("huge", "exceed what one Secret holds"),
])
def test_secrets_script_refuses_what_would_not_work(bundle: CertBundle, tmp_path: Path,
                                                   change: str, message: str) -> None:
    if change == "no-san":
        directory = init_certs(tmp_path / "certs", ["node-a"], days=1).directory
    else:
        directory = Path(shutil.copytree(bundle.directory, tmp_path / "certs"))
        agents = directory / "agents"
        if change == "node-ca":
            shutil.copy(agents / "node-a.crt", agents / "ca.crt")
            shutil.copy(agents / "node-a.key", agents / "ca.key")
        elif change == "no-agents":
            shutil.rmtree(agents)
        elif change == "no-key":
            (agents / "node-a.key").unlink()
        elif change == "no-collector-key":
            (directory / "collector.key").unlink()
        elif change == "huge":
            (agents / "node-a.crt").write_bytes(b"x" * 800_000)  # 1.07 MB in base64
    done = run_script(directory)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr, done.stderr
    assert done.stderr.startswith("k8s-secrets.sh: error: ")


def test_secrets_script_usage() -> None:
    for bad in ([], ["a", "b"], ["--help"]):
        done = subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2
        assert done.stderr.startswith("k8s-secrets.sh: error: usage: scripts/k8s-secrets.sh "
                                      "CERTS_DIR"), done.stderr


# -- the agent ----------------------------------------------------------------------------------


def test_agent_pod_is_privileged_with_its_host_mounts() -> None:
    daemonset, spec = pod_of(load("daemonset.yaml"), "DaemonSet", "driftwarden-agent")
    assert daemonset["spec"]["selector"]["matchLabels"] == \
        daemonset["spec"]["template"]["metadata"]["labels"]
    assert spec["hostPID"] is True
    assert spec.get("hostNetwork", False) is False  # it dials the Service through cluster DNS
    assert spec["automountServiceAccountToken"] is False
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every node
    container = only(spec["containers"])
    assert container["securityContext"] == {"privileged": True}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert sorted(m["name"] for m in mounts.values()) == sorted(volumes)  # none unused
    # from the node: /sys, the BPF file system, the runtimes' sockets (the folder they are
    # in), and the agent's own state; nothing else (no /lib/modules, no /usr/src: the image
    # carries its kernel headers)
    host_paths = {path: volumes[m["name"]]["hostPath"] for path, m in mounts.items()
                  if "hostPath" in volumes[m["name"]]}
    assert host_paths == {
        "/sys": {"path": "/sys", "type": "Directory"},
        "/sys/fs/bpf": {"path": "/sys/fs/bpf", "type": "Directory"},
        "/run": {"path": "/run", "type": "Directory"},
        "/var/lib/driftwarden": {"path": "/var/lib/driftwarden/agent",
                                 "type": "DirectoryOrCreate"},
    }
    # the sockets' folder: read-only, and a runtime's new socket shows up after its restart
    assert mounts["/run"]["readOnly"] is True
    assert mounts["/run"]["mountPropagation"] == "HostToContainer"
    assert mounts["/etc/driftwarden/tls"]["readOnly"] is True
    assert container_env(container, "n1") == {"NODE_NAME": "n1"}
    assert not container.get("ports")  # the metrics listen on loopback: nothing to expose


def test_agent_finds_every_usual_runtime_socket_on_its_mounts() -> None:
    """The sockets the agent probes when no --runtime-endpoint is given (containerd, CRI-O,
    Docker, podman) are all on the pod's mounts, at the paths the agent asks."""
    from driftwarden.agent.runtimes.registry import DEFAULT_ENDPOINTS

    _, spec = pod_of(load("daemonset.yaml"), "DaemonSet", "driftwarden-agent")
    container = only(spec["containers"])
    assert "--runtime-endpoint" not in container["args"]
    mounted = [m["mountPath"] for m in container["volumeMounts"]]
    for url in DEFAULT_ENDPOINTS:
        # /var/run is a link to /run in the image (Debian's layout)
        path = url.removeprefix("unix://").replace("/var/run/", "/run/", 1)
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounted), url


def test_agent_args_pass_the_cli_and_the_agent_validation(cluster: list[dict[str, Any]],
                                                          entrypoint: list[str],
                                                          tmp_path: Path) -> None:
    pod, options, config = agent_options(cluster, "driftwarden-agent", NODE, entrypoint,
                                         tmp_path)
    tls = pod.local("/etc/driftwarden/tls")
    assert (config.address, config.node) == (f"{SERVICE_HOST}:50051", NODE)
    assert (config.tls.cert, config.tls.key, config.tls.ca) == (
        tls / f"{NODE}.crt", tls / f"{NODE}.key", tls / "ca.crt")
    # the collector takes the node from the certificate's CN: it must be --node
    assert certificate_identity(config.tls.cert.read_bytes()).common_name == NODE
    assert options.state_dir == str(pod.local("/var/lib/driftwarden"))
    assert options.allow_non_loopback is True
    assert options.alerts_file is None  # to the collector only
    assert parse_metrics_address(options.metrics) == ("127.0.0.1", 9465)


def test_agent_on_a_node_without_a_certificate_fails_clearly(
        cluster: list[dict[str, Any]], entrypoint: list[str], tmp_path: Path) -> None:
    _, spec = pod_of(cluster, "DaemonSet", "driftwarden-agent")
    container = only(spec["containers"])
    pod = Pod(spec, container, cluster, tmp_path)
    args = build_parser().parse_args(pod.localise(cli_args(container, "node-new", entrypoint)))
    with pytest.raises(UsageError) as err:
        channel_config(options_from_args(args))
    cert = pod.local("/etc/driftwarden/tls/node-new.crt")
    assert str(err.value) == (f"--tls-cert {cert}: cannot read it (No such file or directory); "
                              f"run `driftwarden certs init DIR` to make certificates")


# -- the collector ------------------------------------------------------------------------------


def test_collector_workload_service_and_storage() -> None:
    docs = load("collector.yaml")
    deployment, spec = pod_of(docs, "Deployment", "driftwarden-collector")
    assert deployment["spec"]["replicas"] == 1  # SQLite: one writer
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two pods on the db
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    container = only(spec["containers"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert sorted(m["name"] for m in container["volumeMounts"]) == sorted(volumes)
    pvc = find(docs, "PersistentVolumeClaim", volumes["db"]["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    service = find(docs, "Service", "driftwarden-collector")
    assert service["spec"]["selector"] == labels
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051}
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(50051, "grpc")]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "grpc"}, probe


def test_collector_args_pass_the_cli_and_the_collector_validation(
        cluster: list[dict[str, Any]], entrypoint: list[str], tmp_path: Path) -> None:
    _, spec = pod_of(cluster, "Deployment", "driftwarden-collector")
    container = only(spec["containers"])
    pod = Pod(spec, container, cluster, tmp_path)
    line = cli_args(container, NODE, entrypoint)
    args = build_parser().parse_args(pod.localise(line))
    assert args.command == "collector"
    config = config_from_args(args)  # reads the TLS files, loads the policy, checks the db dir
    tls = pod.local("/etc/driftwarden/tls")
    assert (config.tls.cert, config.tls.key, config.tls.ca, config.tls.ca_flag) == (
        tls / "collector.crt", tls / "collector.key", tls / "ca.crt", "--tls-client-ca")
    assert config.db_path == pod.local("/var/lib/driftwarden/collector.db")
    assert config.policy == load_policy(pod.local("/etc/driftwarden/policy/policy.yaml"))
    assert config.allow_non_loopback is True
    assert config.operator_token is None  # operators use the operator certificate
    # the ports the pod declares are the ones it serves beyond loopback, and only those
    host, port = config.listen_address
    assert not is_loopback(host)
    assert {p["containerPort"] for p in container["ports"]} == {port}
    metrics_host, metrics_port = config.metrics_address
    assert is_loopback(metrics_host) and metrics_port != port
    # listening beyond loopback is refused without TLS: the manifest's TLS flags are needed
    plain = pod.localise(line)
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        at = plain.index(flag)
        del plain[at:at + 2]
    with pytest.raises(UsageError, match="listening beyond loopback needs TLS"):
        config_from_args(build_parser().parse_args(plain))


@pytest.fixture
def running_collector(cluster: list[dict[str, Any]], entrypoint: list[str],
                      tmp_path: Path) -> Iterator[CollectorServer]:
    """The collector from its manifest's args, on loopback instead of the pod's addresses."""
    _, spec = pod_of(cluster, "Deployment", "driftwarden-collector")
    container = only(spec["containers"])
    pod = Pod(spec, container, cluster, tmp_path / "collector")
    args = build_parser().parse_args(pod.localise(cli_args(container, NODE, entrypoint)))
    config = dataclasses.replace(config_from_args(args), listen="127.0.0.1:0",
                                 metrics_listen="127.0.0.1:0")
    with CollectorServer(config) as server:
        yield server


def test_agent_secret_reaches_the_collector_by_its_service_name(
        running_collector: CollectorServer, cluster: list[dict[str, Any]],
        entrypoint: list[str], tmp_path: Path) -> None:
    # Dial the collector under the name the DaemonSet's --collector gives, with the files the
    # agent's Secret puts in the pod: the collector certificate must name it, the agent's
    # certificate must be signed by the CA the collector trusts.
    _, spec = pod_of(cluster, "DaemonSet", "driftwarden-agent")
    container = only(spec["containers"])
    pod = Pod(spec, container, cluster, tmp_path / "agent")
    config = channel_config(options_from_args(build_parser().parse_args(
        pod.localise(cli_args(container, NODE, entrypoint)))))
    dialled_host = config.address.rpartition(":")[0]
    assert dialled_host == SERVICE_HOST
    # the agent's own dial, with its TLS files, to where the Service would route
    with dial(f"127.0.0.1:{running_collector.port}", tls=config.tls,
              options=[("grpc.ssl_target_name_override", dialled_host)]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=20)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_agent_collector_address_is_the_service() -> None:
    agent = only(pod_of(load("daemonset.yaml"), "DaemonSet", "driftwarden-agent")[1]
                 ["containers"])
    args = agent["args"]
    host, _, port = args[args.index("--collector") + 1].rpartition(":")
    service = find(load("collector.yaml"), "Service", "driftwarden-collector")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
