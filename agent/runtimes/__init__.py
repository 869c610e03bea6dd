"""Container runtimes, one file each behind one interface (`base`): what a runtime says about a
container (metadata, lifecycle events) and what it does to one (pause, unpause, kill).

`docker` is the Docker Engine API (Docker, and podman's compatible socket), the only place that
makes a Docker client; `cri` is the Container Runtime Interface (`runtime.v1`: containerd's CRI
plugin, CRI-O; it has no pause, so pause is agent/freezer.py's). `registry` says which endpoints
a node has (given, or the usual sockets) and asks them as one provider, the runtime a cgroup
path names first; its RuntimeRouter and RunningContainers do the same for actions (by the
runtime that owns the container) and the heartbeats' container list. A new runtime is a new file
implementing `base.MetadataProvider` (and `WatchableMetadataProvider` when it has events, its
watcher on `base.RuntimeEventWatcher`), made for an endpoint by `registry.open_provider`.
"""
