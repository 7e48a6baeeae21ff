"""`python -m tests.cluster.node_counts ADDRESS TYPES_JSON`: print the alive nodes of a Ray cluster
by node type, one JSON line whenever they change, until killed (a driver process of its own, so it
can use the cluster's token auth settings from its environment)."""
from __future__ import annotations

import json
import sys
import time

import ray


def kind(resources: dict[str, float], types: dict[str, list[str]]) -> str:
    for name, marks in types.items():
        if marks and all(r in resources for r in marks):
            return name
    return "head"


def main() -> None:
    address, types = sys.argv[1], json.loads(sys.argv[2])
    ray.init(address=address, log_to_driver=False)
    last = None
    while True:
        counts: dict[str, int] = {}
        for n in ray.nodes():
            if n["Alive"]:
                k = kind(n["Resources"], types)
                counts[k] = counts.get(k, 0) + 1
        if counts != last:
            print(json.dumps({"time": time.time(), "counts": counts}), flush=True)
            last = counts
        time.sleep(0.5)


if __name__ == "__main__":
    main()
