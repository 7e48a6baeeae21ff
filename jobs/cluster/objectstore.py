"""What a run did to Ray's object stores: bytes spilled to disk and restored, counted, not guessed.

Batches wait in the object stores of the stream nodes (`data.streams × data.prefetch` per trainer
rank) and of the trainer nodes. When a store is full Ray spills objects to the node's disk and
reads them back when asked: nothing is lost, but every spilled batch costs a disk write and a
read, and a GPU waiting on them shows as data stall. Ray keeps cumulative counters per node;
`StoreTotals.now()` sums them over the cluster (what `ray memory --stats-only` prints), and the
difference over a run is what the run's status and closing line report.

The counters are the cluster's: another job spilling at the same time is counted too.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

COUNTERS = ("created_bytes", "created_objects", "spilled_bytes", "spilled_objects", "restored_bytes",
            "restored_objects")


@dataclass(frozen=True)
class StoreTotals:
    """The cluster's object store figures: capacity and use now, spill and restore counters so far."""

    capacity_bytes: int = 0
    used_bytes: int = 0
    fallback_bytes: int = 0  # objects placed on the filesystem because the store was full
    created_bytes: int = 0   # every object made in the stores (batches above all): what prefetch cost
    created_objects: int = 0
    spilled_bytes: int = 0
    spilled_objects: int = 0
    restored_bytes: int = 0
    restored_objects: int = 0

    @classmethod
    def now(cls) -> Optional["StoreTotals"]:
        """The connected cluster's figures (ray.init done), or None where Ray cannot say."""
        try:
            import ray
            from ray._private import internal_api, state

            if not ray.is_initialized():
                return None
            stats = internal_api.get_memory_info_reply(state.state, timeout_seconds=20.0).store_stats
        except Exception as e:  # noqa: BLE001 - a missing figure must never fail a run
            log.debug("object store figures unavailable: %s", e)
            return None
        return cls(capacity_bytes=int(stats.object_store_bytes_avail), used_bytes=int(stats.object_store_bytes_used),
                   fallback_bytes=int(stats.object_store_bytes_fallback),
                   created_bytes=int(stats.cumulative_created_bytes),
                   created_objects=int(stats.cumulative_created_objects),
                   spilled_bytes=int(stats.spilled_bytes_total), spilled_objects=int(stats.spilled_objects_total),
                   restored_bytes=int(stats.restored_bytes_total),
                   restored_objects=int(stats.restored_objects_total))

    def since(self, before: Optional["StoreTotals"]) -> "StoreTotals":
        """These figures with the spill and restore counters counted from `before` on."""
        if before is None:
            return self
        return dataclasses.replace(self, **{k: max(0, getattr(self, k) - getattr(before, k)) for k in COUNTERS})

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: spill and restore over the run, and the store's size."""
        mib = 2 ** 20
        line = (f"object store: spilled {self.spilled_bytes / mib:.0f} MiB in {self.spilled_objects} object(s), "
                f"restored {self.restored_bytes / mib:.0f} MiB in {self.restored_objects}; "
                f"{self.capacity_bytes / mib:.0f} MiB across the cluster")
        if self.spilled_objects:
            line += (" (batches went to disk: give the nodes' object stores more than "
                     "streams × prefetch × batch bytes, or lower data.prefetch; README \"Object store\")")
        return line
