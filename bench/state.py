"""The bench's own shop in var/bench/: demo data, work dir and a private copy of the Feast repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from propensity.feature_store import copy_definitions

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 1500  # enough that most users fill the 200-candidate cap
N_USERS = 5000


@dataclass(frozen=True)
class BenchState:
    """Where the bench shop lives; env() points every propensity command at it."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def feature_repo(self) -> Path:
        return self.root / "feature_repo"

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "models"

    @property
    def stamp(self) -> Path:
        return self.root / "state.json"

    def current_model_dir(self) -> Path:
        version = (self.model_dir / "CURRENT").read_text().strip()
        return self.model_dir / "versions" / version

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PROPENSITY_WORK_DIR": str(self.work_dir),
            "PROPENSITY_DATA_DIR": str(self.data_dir),
            "PROPENSITY_FEATURE_REPO": str(self.feature_repo),
            "FEAST_USAGE": "False",
        }

    def ready(self) -> bool:
        return self.stamp.exists() and (self.model_dir / "CURRENT").exists()


def ensure_state(root: Path, rebuild: bool = False, progress=print) -> BenchState:
    """Build the bench shop if it is missing (about 2.5 minutes on 2 cores); reuse it otherwise."""
    state = BenchState(root)
    if state.ready() and not rebuild:
        info = json.loads(state.stamp.read_text())
        progress(f"bench state: reusing {root} (built {info['built_at']}, {info['n_items']} items, {info['n_users']} users; --rebuild to redo)")
        return state
    progress(f"bench state: building {root} ({N_ITEMS} items, {N_USERS} users)")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    copy_definitions(state.feature_repo)
    cli = Path(sys.executable).with_name("propensity")
    log = root / "build.log"
    with log.open("w") as out:
        for args in (["demo-data", "--items", str(N_ITEMS), "--users", str(N_USERS)], ["run"]):
            result = subprocess.run([str(cli), *args], env=state.env(), cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if result.returncode != 0:
                raise RuntimeError(f"`propensity {' '.join(args)}` failed; see {log}")
    state.stamp.write_text(json.dumps({"built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "n_items": N_ITEMS, "n_users": N_USERS}))
    progress(f"bench state: built in {time.perf_counter() - t0:.0f}s (log {log})")
    return state
