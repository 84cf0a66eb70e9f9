"""How contiguous are the KV blocks the engine hands out? The scheduler and block manager, no model.

Runs :func:`fullgraph_backend.engine.block_layout.simulate` on the workload given by the flags
(one per field of its ``Workload``) and prints the workload and the layout as one JSON line:
``boundaries_in_order``, the share of 16-token-block boundaries that run in order, and
``tiles_one_run``, the share of 4-block windows (a 64-key attention tile) that are one ascending
run. docs/perf-notes.md, section 15, holds the runs behind the block manager's placement.

Usage (CPU): python tools/block_layout.py [--num-prompts 2000] [--rate 10] [--num-kv-blocks 8192]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.engine.block_layout import Workload, simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Workload):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    workload = Workload(**vars(parser.parse_args()))
    print(json.dumps({**dataclasses.asdict(workload), **dataclasses.asdict(simulate(workload))}))


if __name__ == "__main__":
    main()
