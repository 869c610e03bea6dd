#!/bin/sh
# The image's entrypoint (deploy/Dockerfile): driftwarden, once bcc can find kernel headers.
#
# bcc compiles the probes against /lib/modules/$(uname -r)/build (and .../source). The
# DaemonSet does not mount the node's /lib/modules, so that path is missing in the pod and is
# linked here to the headers the image carries (/opt/kernel-headers: Debian's, for another
# kernel than the node's, which is fine because the probes read no kernel structs). A path
# that exists (the node's own headers, mounted by hand) is left alone. Where the root file
# system is read-only or the user is not root (the collector's pod), nothing is linked: only
# the agent, `trace` and `doctor` compile probes.
set -eu
modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build" ] && [ -d /opt/kernel-headers/build ]; then
  { mkdir -p "$modules" \
    && ln -sfn /opt/kernel-headers/build "$modules/build" \
    && ln -sfn /opt/kernel-headers/source "$modules/source"; } 2>/dev/null || true
fi
exec driftwarden "$@"
