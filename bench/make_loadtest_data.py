"""Write loadtest/data/*.json (ghz request data) from the bench shop's demo data.

    python -m bench.make_loadtest_data          (after `make bench` has built var/bench/)

Ids come from the offline feature tables: users with recent items (the personalised path) and
items from the catalog, chosen with a fixed seed so the committed files are reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench.state import PROJECT_ROOT

N_RECOMMEND = 1000  # distinct users for Recommend: the same rotation as make bench, so no cache flatters the result
N_SCORE_ITEMS = 100


def make(state_root: Path, out_dir: Path, seed: int = 7) -> dict[str, int]:
    offline = state_root / "feature_repo" / "data" / "offline"
    users = sorted(pd.read_parquet(offline / "user_interests.parquet", columns=["user_id"])["user_id"].astype(str).unique())
    items = sorted(pd.read_parquet(offline / "item_stats.parquet", columns=["item_id"])["item_id"].astype(str).unique())
    rng = np.random.default_rng(seed)
    chosen = [str(u) for u in rng.choice(users, size=min(N_RECOMMEND, len(users)), replace=False)]
    files = {
        "recommend_requests.json": [{"user_id": u, "num_items": 10} for u in chosen],
        "score_users_requests.json": [
            {"user_ids": [str(u) for u in rng.choice(users, size=1000, replace=False)]} for _ in range(5)
        ],
        "score_items_requests.json": [
            {"user_id": u, "item_ids": [str(i) for i in rng.choice(items, size=20, replace=False)]} for u in chosen[:N_SCORE_ITEMS]
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, requests in files.items():
        (out_dir / name).write_text("[\n" + ",\n".join(json.dumps(r) for r in requests) + "\n]\n")  # one message per line
    return {name: len(requests) for name, requests in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=str(PROJECT_ROOT / "var" / "bench"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "loadtest" / "data"))
    args = parser.parse_args(argv)
    for name, count in make(Path(args.state), Path(args.out)).items():
        print(f"{args.out}/{name}: {count} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
