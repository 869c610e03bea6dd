"""One exception tree for driftwarden.

Every error's message is what the CLI prints: one line saying what was wrong and what to do.
"""


class DriftwardenError(Exception):
    """Base of every error driftwarden raises on purpose."""


class UsageError(DriftwardenError):
    """A flag, argument or config value is invalid."""


class HostSupportError(DriftwardenError):
    """The host lacks something the agent needs (root, BPF, tracefs, headers, ...)."""


class ProbeLoadError(HostSupportError):
    """The BPF programs failed to compile, load or attach."""


class CaptureFileError(DriftwardenError):
    """A recorded event file is missing, truncated, corrupt or of another version."""


class DecodeError(DriftwardenError):
    """A kernel record could not be decoded (counted, never fatal in the pipeline)."""


class AttributionError(DriftwardenError):
    """Container attribution failed in a way the caller must know about."""
