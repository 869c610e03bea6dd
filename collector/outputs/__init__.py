"""Alert outputs of the collector: a webhook, syslog and a JSON-lines file.

Configured with ``driftwarden collector --outputs FILE`` (:mod:`.config` reads it); each
output is one file behind one interface (:mod:`.base`: the :class:`~.base.Sink` a kind
implements, and the runner that gives every output its filter, bounded queue, retries with
backoff and counted drops): :mod:`.webhook`, :mod:`.syslog`, :mod:`.jsonfile`. The collector's
service offers each newly stored alert once (:meth:`~.base.OutputSet.offer`).
"""

from driftwarden.collector.outputs.base import (
    OutputConfig,
    OutputRunner,
    OutputSet,
    RetryPolicy,
    Sink,
    SinkConfig,
)
from driftwarden.collector.outputs.config import load_outputs, parse_outputs

__all__ = ["OutputConfig", "OutputRunner", "OutputSet", "RetryPolicy", "Sink", "SinkConfig",
           "load_outputs", "parse_outputs"]
