"""The response-action vocabulary the agent, the collector and the wire codec share: what can be
done to a container (:class:`ActionType`) and how an action ended (:class:`ActionStatus`).

The values are the texts the store, the audit trail and the logs keep (``container_gone``). The
wire writes the same words with ``-`` (``container-gone``, the proto enum's name in lower case):
:mod:`driftwarden.core.wire` converts (``action_status_to_proto`` / ``action_status_from_proto``).
"""

from __future__ import annotations

import enum


class ActionType(enum.StrEnum):
    PAUSE = "pause"  # the runtime's pause (cgroup freezer)
    RESUME = "resume"
    KILL = "kill"  # the runtime's kill (SIGKILL)
    QUARANTINE = "quarantine"  # deny the container's network; it keeps running
    RELEASE = "release"  # undo a quarantine


class ActionStatus(enum.StrEnum):
    """Where an action is: pending, then the agent's result (done ... refused), or skipped."""

    PENDING = "pending"  # sent to the agent, no result yet
    DONE = "done"  # the action changed the container's state
    ALREADY = "already"  # the container was already in the requested state
    CONTAINER_GONE = "container_gone"  # no such container (or it no longer runs: no cgroup)
    FAILED = "failed"  # tried and failed; the message says why
    REFUSED = "refused"  # not attempted: an unknown action or option, an invalid or exempt id
    SKIPPED = "skipped"  # not sent: the policy decided not to act (dry run, limit, exemption)

    @classmethod
    def parse(cls, value: str | ActionStatus) -> ActionStatus:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown action status {value!r} (one of {names})") from None


# What an agent may report as an action's result (PENDING and SKIPPED are the collector's).
AGENT_RESULTS = (ActionStatus.DONE, ActionStatus.ALREADY, ActionStatus.CONTAINER_GONE,
                 ActionStatus.FAILED, ActionStatus.REFUSED)


__all__ = ["AGENT_RESULTS", "ActionStatus", "ActionType"]
