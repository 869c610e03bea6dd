#!/usr/bin/env bash
# Turn a `driftwarden certs init` directory into the Kubernetes objects deploy/*.yaml mount:
#   Namespace driftwarden
#   Secret driftwarden-collector-tls   ca.crt collector.crt collector.key  (deploy/collector.yaml)
#   Secret driftwarden-agent-tls       ca.crt <node>.crt <node>.key ...    (deploy/daemonset.yaml)
# printed as YAML on stdout, for `kubectl apply -f -`:
#
#   driftwarden certs init ./dw-certs --nodes node-a,node-b \
#       --collector-names driftwarden-collector.driftwarden.svc
#   scripts/k8s-secrets.sh ./dw-certs | kubectl apply -f -
#
# Secret keys cannot contain '/', so agents/<node>.crt and .key become the flat keys <node>.crt
# and <node>.key next to ca.crt; the DaemonSet picks its node's pair by $(NODE_NAME). Never
# copied: ca.key (keep it off the cluster), operator.* (the operators' own credentials).
set -euo pipefail

NAMESPACE=driftwarden
SERVICE_NAME="driftwarden-collector.$NAMESPACE.svc"
MAX_SECRET_DATA=1000000 # a Secret holds at most 1 MiB; leave room for the rest of the object

die() {
  echo "k8s-secrets.sh: error: $*" >&2
  exit 2
}

[[ $# -eq 1 && $1 != -* ]] || die "usage: scripts/k8s-secrets.sh CERTS_DIR  (a \`driftwarden certs init\` directory; YAML on stdout)"
dir="${1%/}"
[[ -d $dir ]] || die "$dir is not a directory; make one with \`driftwarden certs init $dir --nodes ...\`"
for f in ca.crt collector.crt collector.key; do
  [[ -f $dir/$f ]] || die "$dir/$f is missing; is $dir a \`driftwarden certs init\` directory?"
done

shopt -s nullglob
nodes=()
for crt in "$dir"/agents/*.crt; do
  node="$(basename "$crt" .crt)"
  [[ -f $dir/agents/$node.key ]] || die "$crt has no key $dir/agents/$node.key"
  # Same rule as `certs init` (a node name is a CN and a DNS name); also a valid Secret key.
  [[ $node =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$ ]] ||
    die "agent certificate $crt: '$node' is not a node name certs init makes"
  [[ $node != ca ]] || die "a node named 'ca' would collide with the CA's key ca.crt in the Secret; rename the node's certificate"
  nodes+=("$node")
done
((${#nodes[@]} > 0)) || die "$dir/agents has no agent certificates; run \`driftwarden certs init $dir --force --nodes <every node name>\`"

# The agents dial $SERVICE_NAME and check it against the collector's certificate.
if command -v openssl >/dev/null; then
  sans="$(openssl x509 -in "$dir/collector.crt" -noout -ext subjectAltName 2>/dev/null)" ||
    die "$dir/collector.crt is not a readable certificate"
  tr ', ' '\n\n' <<<"$sans" | grep -qFx "DNS:$SERVICE_NAME" ||
    die "$dir/collector.crt does not name $SERVICE_NAME, which the agents dial; remake it: \`driftwarden certs init $dir --force --nodes ... --collector-names $SERVICE_NAME\`"
else
  echo "k8s-secrets.sh: warning: openssl not found; not checking that collector.crt names $SERVICE_NAME" >&2
fi

b64() { base64 <"$1" | tr -d '\n'; }

total=0
entry() { # entry KEY FILE: one `data:` line of a Secret
  local value
  value="$(b64 "$2")"
  total=$((total + ${#value}))
  printf '  "%s": %s\n' "$1" "$value"
}

secret_head() {
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n' "$1" "$NAMESPACE"
  printf '  labels: {app.kubernetes.io/part-of: driftwarden}\ntype: Opaque\ndata:\n'
}

out="$(
  printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n' "$NAMESPACE"
  secret_head driftwarden-collector-tls
  entry ca.crt "$dir/ca.crt"
  entry collector.crt "$dir/collector.crt"
  entry collector.key "$dir/collector.key"
  secret_head driftwarden-agent-tls
  total=0 # the limit is per Secret
  entry ca.crt "$dir/ca.crt"
  for node in "${nodes[@]}"; do
    entry "$node.crt" "$dir/agents/$node.crt"
    entry "$node.key" "$dir/agents/$node.key"
  done
  ((total <= MAX_SECRET_DATA)) ||
    die "the agents' certificates (${#nodes[@]} nodes, $total bytes) exceed what one Secret holds"
)"
printf '%s\n' "$out"
echo "k8s-secrets.sh: Secrets for namespace $NAMESPACE: collector, and agents on ${#nodes[@]} node(s): ${nodes[*]}" >&2
