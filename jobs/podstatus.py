"""RunPod pod statuses (`desiredStatus`) and which of them mean "alive" or "gone for good".

The GraphQL `PodStatus` enum (https://graphql-spec.runpod.io/#definition-PodStatus) is
CREATED, RUNNING, RESTARTING, EXITED, PAUSED, DEAD, TERMINATED; the REST API documents
RUNNING / EXITED / TERMINATED (runpod/docs api-reference/openapi.json, Pod.desiredStatus).
A freshly created pod is not RUNNING at once: the SDK's own CLI waits for it
(runpod==1.12.0 runpod/cli/groups/project/functions.py, `desiredStatus != "RUNNING"`).

Only a terminal status means the pod's container can never answer again. Everything
else, including a value RunPod may add later, counts as alive (booting, restarting or
running): the callers bound how long they wait for an alive pod, so an unknown status
costs at most that wait, while reading it as dead would throw away a booting run.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class PodStatus(str, Enum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    EXITED = "EXITED"
    PAUSED = "PAUSED"
    DEAD = "DEAD"
    TERMINATED = "TERMINATED"
    UNKNOWN = "UNKNOWN"  # a value this code does not know yet

    @classmethod
    def parse(cls, value: object) -> PodStatus:
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            return cls.UNKNOWN


# The container's process ended (EXITED still bills until terminated), docker gave up on
# it (DEAD), or the pod is deleted (TERMINATED).
TERMINAL_POD_STATUSES = frozenset({PodStatus.EXITED, PodStatus.DEAD, PodStatus.TERMINATED})
# Not yet (or not any more) RUNNING, but expected to get there by itself.
BOOTING_POD_STATUSES = frozenset({PodStatus.CREATED, PodStatus.RESTARTING, PodStatus.PAUSED,
                                  PodStatus.UNKNOWN})
ALIVE_POD_STATUSES = frozenset(set(PodStatus) - TERMINAL_POD_STATUSES)


def pod_status(pod: dict[str, Any]) -> PodStatus:
    """The pod's desiredStatus; a pod record without one reads as RUNNING (as before)."""
    return PodStatus.parse(pod.get("desiredStatus") or PodStatus.RUNNING.value)


def pod_is_alive(pod: dict[str, Any] | None) -> bool:
    """True while the pod exists and is not in a terminal status (booting counts)."""
    return bool(pod) and pod_status(pod) in ALIVE_POD_STATUSES  # type: ignore[arg-type]


def pod_is_deleted(pod: dict[str, Any] | None) -> bool:
    """Gone from RunPod (no record, or TERMINATED): nothing left to terminate or bill."""
    return not pod or pod_status(pod) is PodStatus.TERMINATED
