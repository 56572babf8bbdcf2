"""Dedup throughput on the two shapes of real files: catalog rows and varied rows.

Catalog rows share shop boilerplate (unrelated rows at word 3-gram Jaccard ~0.5, the case
that made the old LSH scan quadratic); varied rows are unrelated tickets. Each set has a
known number of planted exact and near duplicates (tests/datagen.py), so the counts show
recall as well as speed. Target (issue 14): 50k rows in < 20 s on the 2-core dev machine.

    .venv/bin/python bench/bench_dedup.py [--rows 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.dedup import DedupIndex, dedup  # noqa: E402
from tests.datagen import catalog_pairs, varied_pairs  # noqa: E402


def run(name: str, rows: int) -> float:
    gen = catalog_pairs if name == "catalog" else varied_pairs
    pairs, planted = gen(rows)
    index = DedupIndex()
    wall, cpu = time.perf_counter(), time.process_time()
    res = dedup(pairs, index=index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{name:8s} {rows} rows: {wall:5.1f} s wall ({cpu:5.1f} s CPU), "
          f"{rows / wall:7.0f} rows/s | exact dups {len(res.exact_dupes)} "
          f"(planted {planted.exact}), near dups {len(res.near_dupes)} "
          f"(planted {planted.near}), kept {len(res.kept)} | exact Jaccard checks "
          f"{index.verified / rows:.2f}/row, max {index.max_verified}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    args = ap.parse_args()
    worst = max(run("catalog", args.rows), run("varied", args.rows))
    print(f"slowest: {worst:.1f} s for {args.rows} rows (target < 20 s for 50k)")


if __name__ == "__main__":
    main()
