"""One exception tree for driftwarden, in one module.

Every error's message is what the CLI prints: one line saying what was wrong and what to do.
The command line maps :class:`UsageError` to exit code 2 and any other
:class:`DriftwardenError` to 1; nothing outside this tree is raised on purpose.

    DriftwardenError
    ├── UsageError                 a flag, argument, config, policy or filter is invalid
    │   ├── FilterError            a subscribe / list filter
    │   └── PolicyError            a response policy file
    ├── HostSupportError           the host lacks root, BPF, tracefs, headers, ...
    │   └── ProbeLoadError         BPF programs failed to compile, load or attach
    ├── CaptureFileError           a recorded event file is unusable
    ├── DecodeError                a kernel record could not be decoded (counted)
    │   └── MalformedRecord        raised inside a decoder
    ├── AttributionError           container attribution failed
    │   └── MetadataUnavailableError   the runtime could not be asked
    ├── RuntimeActionError         the runtime refused or failed an action
    │   ├── ContainerNotFoundError the runtime does not know the container
    │   └── RuntimeNotServedError  the socket answers, but not with that API (CRI off)
    ├── BaselineError              a baseline file is unusable
    ├── ModelError                 the anomaly model
    │   ├── NotEnoughWindowsError  too few windows to fit
    │   └── ModelStateError        a stored model state is unusable
    ├── SpoolError                 the agent's alert spool
    │   └── SpoolFull              a batch refused: the spool is full
    ├── ChannelError               the agent's channel to the collector
    ├── CertError                  certificates could not be made or read
    │   └── PeerIdentityError      a peer presented no usable identity
    ├── InvalidMessage             a wire message is malformed or out of bounds
    ├── CollectorError             the collector cannot start
    ├── StoreError                 the collector's store
    │   ├── UnknownAction          no action with that id
    │   ├── UnknownContainer       no known container matches
    │   └── AmbiguousContainer     several known containers match
    ├── OutputError                an alert output (webhook, syslog, file) could not deliver
    └── RpcAbort                   end a gRPC call with a status (collector servicers)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class DriftwardenError(Exception):
    """Base of every error driftwarden raises on purpose."""


# -- input ---------------------------------------------------------------------------------------


class UsageError(DriftwardenError):
    """A flag, argument or config value is invalid."""


class FilterError(UsageError, ValueError):
    """A subscribe filter argument is invalid; the message says which one and what is allowed."""


class PolicyError(UsageError, ValueError):
    """A policy file is unreadable or invalid; the message says where and what is allowed."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        super().__init__(f"{source}: {path}: {problem}" if path else f"{source}: {problem}")


# -- the host and the kernel ---------------------------------------------------------------------


class HostSupportError(DriftwardenError):
    """The host lacks something the agent needs (root, BPF, tracefs, headers, ...)."""


class ProbeLoadError(HostSupportError):
    """The BPF programs failed to compile, load or attach."""


class CaptureFileError(DriftwardenError):
    """A recorded event file is missing, truncated, corrupt or of another version."""


class DecodeError(DriftwardenError):
    """A kernel record could not be decoded (counted, never fatal in the pipeline)."""


class MalformedRecord(DecodeError, ValueError):
    """Raised inside decoders; the decoder registry turns it into a counted error."""


# -- containers and their runtimes ---------------------------------------------------------------


class AttributionError(DriftwardenError):
    """Container attribution failed in a way the caller must know about."""


class MetadataUnavailableError(AttributionError):
    """The container runtime could not be asked (socket missing, daemon down, timeout, 5xx)."""


class RuntimeActionError(DriftwardenError):
    """The runtime refused or failed a call; the message is its reason."""


class ContainerNotFoundError(RuntimeActionError):
    """The runtime does not know the container (removed, or never existed)."""


class RuntimeNotServedError(RuntimeActionError):
    """The socket answers, but does not serve the API asked for (a containerd without its CRI
    plugin, as Docker's own containerd runs)."""


# -- baselines and models ------------------------------------------------------------------------


class BaselineError(DriftwardenError):
    """A baseline file could not be used (corrupt, truncated, another image, other version)."""


class ModelError(DriftwardenError):
    """The anomaly model cannot be fitted or restored."""


class NotEnoughWindowsError(ModelError):
    """Fewer training windows than `min_windows`: keep learning before fitting a model."""


class ModelStateError(ModelError):
    """A stored model state is malformed, of an unknown version or for unknown features."""


class ForestFitError(ModelError):
    """The child process that fits forests failed, timed out or answered nonsense."""


# -- the agent's way to the collector ------------------------------------------------------------


class SpoolError(DriftwardenError):
    """The spool cannot be opened or used (locked by another process, closed, I/O error)."""


class SpoolFull(SpoolError):
    """A batch was refused because the spool holds ``max_bytes`` already; nothing else is lost."""

    def __init__(self, message: str, *, refused: int) -> None:
        super().__init__(message)
        self.refused = refused


class ChannelError(DriftwardenError):
    """The channel cannot be used (it is closed; unreadable TLS files are a CertError)."""


class CertError(DriftwardenError):
    """Certificates could not be made or read."""


class PeerIdentityError(CertError):
    """A peer presented no usable certificate identity."""


class InvalidMessage(DriftwardenError, ValueError):
    """A message from the wire is malformed or out of bounds; the text names the field."""


# -- the collector -------------------------------------------------------------------------------


class CollectorError(DriftwardenError):
    """The collector cannot start (address in use, unreadable files, ...)."""


class StoreError(DriftwardenError):
    """The store cannot be opened or used (I/O, corruption, newer schema, closed store)."""


class OutputError(DriftwardenError):
    """An output (webhook, syslog, file) could not deliver; ``retryable`` false means trying
    again cannot help (e.g. the receiver refused the request with a 4xx)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownAction(StoreError):
    """No action with that id is stored."""


class _Candidate(Protocol):
    def describe(self) -> str: ...


def _listed(candidates: Sequence[_Candidate]) -> str:
    return ", ".join(c.describe() for c in candidates)


def _similar(candidates: Sequence[_Candidate]) -> str:
    return f"; similar: {_listed(candidates)}" if candidates else ""


class UnknownContainer(StoreError):
    """No known container matches the operator's text; ``candidates`` are similar ones."""

    def __init__(self, text: str, candidates: Sequence[_Candidate] = (), *,
                 min_prefix: int = 4) -> None:
        self.text, self.candidates = text, tuple(candidates)
        super().__init__(
            f"no container known from alerts matches {text!r}: give a full container id, a "
            f"container name, or an id prefix of at least {min_prefix} characters"
            f"{_similar(self.candidates)}")


class AmbiguousContainer(StoreError):
    """Several known containers match the operator's text; ``candidates`` lists them."""

    def __init__(self, text: str, candidates: Sequence[_Candidate], why: str) -> None:
        self.text, self.candidates = text, tuple(candidates)
        super().__init__(f"{text!r} is ambiguous ({why}): {_listed(self.candidates)}; give the "
                         "full container id")


class UnknownImage(DriftwardenError):
    """No fleet baseline matches the operator's image reference; ``candidates`` are similar."""

    def __init__(self, text: str, candidates: Sequence[_Candidate] = (), *,
                 min_prefix: int = 4) -> None:
        self.text, self.candidates = text, tuple(candidates)
        super().__init__(
            f"no baseline matches image {text!r}: give an image key (sha256:...), a unique "
            f"prefix of its digits (at least {min_prefix}) or an image name[:tag] "
            f"(`driftwarden baseline list` shows them){_similar(self.candidates)}")


class AmbiguousImage(DriftwardenError):
    """Several fleet baselines match the operator's image reference."""

    def __init__(self, text: str, candidates: Sequence[_Candidate], why: str) -> None:
        self.text, self.candidates = text, tuple(candidates)
        super().__init__(f"image {text!r} is ambiguous ({why}): {_listed(self.candidates)}; "
                         "give more of the key")


class RpcAbort(DriftwardenError):
    """End the current gRPC call with this status (raised by the collector's service, mapped by
    its servicers). ``code`` is a ``grpc.StatusCode``."""

    def __init__(self, code: Any, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
