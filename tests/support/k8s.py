"""What the kubelet does with a pod spec, for the deploy tests (no cluster here): read manifests
and deploy/Dockerfile, expand a container's $(VAR) args from its env and the downward API,
materialise its volumes in a temp dir from the objects that fill them (Secrets, ConfigMaps,
PVCs, host paths), and make the Secrets scripts/k8s-secrets.sh makes from a `certs init`
directory. Used by tests/test_deploy.py (the plain manifests), tests/test_helm.py (the chart's
rendered objects) and tests/test_image.py (the image run as the DaemonSet runs it).
"""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SECRETS_SCRIPT = REPO / "scripts" / "k8s-secrets.sh"
NAMESPACE = "driftwarden"
SERVICE_HOST = "driftwarden-collector.driftwarden.svc"
# What the image's ENTRYPOINT runs: deploy/entrypoint.sh, which ends in `exec driftwarden "$@"`
ENTRYPOINT_WRAPPER = "/usr/local/bin/driftwarden-entrypoint"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Doc = dict[str, Any]


# -- reading the files ---------------------------------------------------------------------------


def load(name: str) -> list[Doc]:
    """The documents of deploy/NAME."""
    return load_text((DEPLOY / name).read_text(encoding="utf-8"))


def load_text(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def only(items: list[Doc]) -> Doc:
    assert len(items) == 1, items
    return items[0]


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    text = path.read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                           if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage (from its FROM on): what the image is made of."""
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(instructions: list[tuple[str, str]], word: str) -> list[str]:
    value = yaml.safe_load(only([{"v": rest} for w, rest in instructions if w == word])["v"])
    assert isinstance(value, list), f"{word} must be in exec form (a JSON list)"
    return value


# -- what the kubelet does with a container --------------------------------------------------------


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args: a defined VAR is replaced, `$$` is a literal `$`,
    anything else stays as written."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR.sub(one, text)


def container_env(container: Doc, node: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "spec.nodeName", f"env {var['name']}: unexpected source {field}"
            env[var["name"]] = node
    return env


def argv(container: Doc, node: str, image_entrypoint: list[str]) -> list[str]:
    """The command line the container runs (the image's ENTRYPOINT unless `command` is set)."""
    env = container_env(container, node)
    command = container.get("command", image_entrypoint)
    line = [expand(word, env) for word in [*command, *container.get("args", [])]]
    left = [word for word in line if "$(" in word]
    assert not left, f"undefined variables left in {container['name']}'s args: {left}"
    return line


def cli_args(container: Doc, node: str, image_entrypoint: list[str]) -> list[str]:
    """The `driftwarden` arguments of a container that runs the image's entrypoint."""
    line = argv(container, node, image_entrypoint)
    assert line[0] in (ENTRYPOINT_WRAPPER, "driftwarden"), line
    return line[1:]


class Pod:
    """A pod spec's volumes materialised under `root`, and its paths mapped there."""

    def __init__(self, spec: Doc, container: Doc, objects: list[Doc], root: Path) -> None:
        self.spec = spec
        self.container = container
        self.volumes = {v["name"]: v for v in spec.get("volumes", [])}
        self.mounts: dict[str, Path] = {}  # mountPath -> local directory or file
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in self.volumes, f"volumeMount {mount['name']} has no volume"
            local = root / mount["name"]
            if not local.exists():  # two mounts of one volume share its materialisation
                fill_volume(self.volumes[mount["name"]], local, objects)
            self.mounts[mount["mountPath"]] = local

    def local(self, path: str) -> Path:
        """Where `path` (absolute, in the container) is under the materialised volumes."""
        for mount_path in sorted(self.mounts, key=len, reverse=True):
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                return self.mounts[mount_path] / path[len(mount_path):].lstrip("/")
        raise AssertionError(f"{path} is on no volume of {self.container['name']}: it would "
                             f"not exist in the image or not survive the pod")

    def localise(self, words: list[str]) -> list[str]:
        return [str(self.local(w)) if w.startswith("/") else w for w in words]


def fill_volume(volume: Doc, local: Path, objects: list[Doc]) -> None:
    """What the kubelet puts in a volume: a Secret's or ConfigMap's keys as files (the
    Secret's defaultMode applied), nothing for a PVC, an emptyDir or a host path (a file
    stands for a socket or file host path)."""
    mode = None
    if "secret" in volume:
        data = {k: base64.b64decode(v) for k, v in
                find(objects, "Secret", volume["secret"]["secretName"])["data"].items()}
        mode = volume["secret"].get("defaultMode")
    elif "configMap" in volume:
        data = {k: v.encode() for k, v in
                find(objects, "ConfigMap", volume["configMap"]["name"])["data"].items()}
    elif "persistentVolumeClaim" in volume:
        find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        data = {}
    elif "hostPath" in volume or "emptyDir" in volume:
        if volume.get("hostPath", {}).get("type") in ("Socket", "File"):
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()  # stands for the host's file
            return
        data = {}
    else:
        raise AssertionError(f"volume {volume['name']}: unexpected type {sorted(volume)}")
    local.mkdir(parents=True)
    for key, value in data.items():
        assert "/" not in key, f"volume {volume['name']}: key {key!r}"
        (local / key).write_bytes(value)
        if mode is not None:
            (local / key).chmod(mode)


def pod_of(docs: list[Doc], kind: str, name: str) -> tuple[Doc, Doc]:
    workload = find(docs, kind, name)
    spec = workload["spec"]["template"]["spec"]
    return workload, spec


def agent_options(objects: list[Doc], daemonset: str, node: str, image_entrypoint: list[str],
                  root: Path) -> tuple[Pod, Any, Any]:
    """The agent container of DaemonSet `daemonset` as the real CLI reads it on `node`: its
    args, with the pod's volumes materialised under `root`, through the root parser and the
    agent's own validation (which reads the TLS files). (pod, AgentOptions, ChannelConfig)."""
    from driftwarden.agent.command import channel_config, options_from_args
    from driftwarden.cli.main import build_parser

    _, spec = pod_of(objects, "DaemonSet", daemonset)
    container = only(spec["containers"])
    pod = Pod(spec, container, objects, root)
    args = build_parser().parse_args(pod.localise(cli_args(container, node, image_entrypoint)))
    assert args.command == "agent"
    options = options_from_args(args)
    return pod, options, channel_config(options)


# -- the Secrets -------------------------------------------------------------------------------


def run_secrets_script(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SECRETS_SCRIPT), str(directory)], capture_output=True,
                          text=True, timeout=60, check=False)


def secrets_of(directory: Path) -> list[Doc]:
    """The objects scripts/k8s-secrets.sh makes from a `certs init` directory."""
    done = run_secrets_script(directory)
    assert done.returncode == 0, done.stderr
    return load_text(done.stdout)


__all__ = [
    "DEPLOY",
    "ENTRYPOINT_WRAPPER",
    "NAMESPACE",
    "SECRETS_SCRIPT",
    "SERVICE_HOST",
    "Pod",
    "agent_options",
    "argv",
    "cli_args",
    "container_env",
    "dockerfile",
    "exec_form",
    "expand",
    "fill_volume",
    "final_stage",
    "find",
    "load",
    "load_text",
    "only",
    "pod_of",
    "run_secrets_script",
    "secrets_of",
]
