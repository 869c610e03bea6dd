"""driftwarden: runtime security for containers.

Public surface is small on purpose: the CLI (`driftwarden.cli`), the exception tree
(`driftwarden.errors`) and the stage modules named in README's architecture section.
"""

__version__ = "0.1.0"
