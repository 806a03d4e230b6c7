"""bench.open_loop end to end against a stub server: every request accounted for, users rotated, raw times written.

No timing assertions: only counts and the bookkeeping of due / issued / answered times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.aio_server import ThreadedAioServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StubRecommender(pb_grpc.RecommendationServiceServicer):
    """Items for everyone; a fallback answer for u-fallback, an error for u-bad."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def Recommend(self, request, context):
        self.seen.append(request.user_id)
        if request.user_id == "u-bad":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        return pb.RecommendResponse(user_id=request.user_id, items=[pb.RankedItem(item_id="i1", score=1.0)],
                                    fallback_used=request.user_id == "u-fallback")


@pytest.fixture()
def stub_server():
    servicer = StubRecommender()
    server = ThreadedAioServer(lambda s: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, s))
    try:
        yield server.port, servicer
    finally:
        server.stop()


def test_open_loop_accounts_for_every_request_and_rotates_users(stub_server, tmp_path):
    port, servicer = stub_server
    users = [f"u{i:03d}" for i in range(8)] + ["u-fallback", "u-bad"]
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    out, raw = tmp_path / "result.json", tmp_path / "requests.npz"
    cmd = [sys.executable, "-m", "bench.open_loop", "--target", f"127.0.0.1:{port}", "--users-file", str(tmp_path / "users.txt"),
           "--rate", "100", "--seconds", "0.5", "--channels", "3", "--out", str(out), "--raw", str(raw)]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 50 and result["channels"] == 3
    assert result["failures"] == 5  # u-bad is every 10th request
    assert result["answered"] == 45 and result["fallbacks"] == 5  # u-fallback answers, but from the fallback
    assert result["distinct_users_answered"] == 9 and "u-bad" not in result["users_answered"]
    for key in ("p50", "p99", "service_p50", "lateness_p50_ms", "lateness_p99_ms", "lateness_max_ms", "generator_limited"):
        assert key in result
    # Per user, in rotation: 5 each, plus the one warm-up call per channel (to the first user).
    assert sorted(set(servicer.seen)) == sorted(users) and servicer.seen.count("u001") == 5 and servicer.seen.count("u000") == 5 + 3
    times = np.load(raw)
    assert times["due"].shape == (50,) and np.all(np.diff(times["due"]) > 0)
    sent = ~np.isnan(times["issued"])
    assert sent.all() and np.all(times["issued"] >= times["due"] - 1e-4)  # never (meaningfully) sent early
    assert int(times["ok"].sum()) == 50 - 5  # the fallback answers have items
    assert np.all(times["answered"][times["ok"]] >= times["issued"][times["ok"]])
