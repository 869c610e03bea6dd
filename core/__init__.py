"""driftwarden: runtime security for containers.

Public surface is small on purpose: the CLI (`driftwarden.cli.main`), the exception tree
(`driftwarden.core.errors`) and the stage modules named in README's architecture section.
"""

__version__ = "0.1.0"
