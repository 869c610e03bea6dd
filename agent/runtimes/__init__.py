"""Container runtimes, one file each behind one interface (`base`): what a runtime says about a
container (metadata, lifecycle events) and what it does to one (pause, unpause, kill).

`docker` is the Docker Engine API, the only place that makes a Docker client. A new runtime
(CRI for containerd and CRI-O, podman) is a new file implementing `base.MetadataProvider`
(and `WatchableMetadataProvider` when it has an event stream).
"""
