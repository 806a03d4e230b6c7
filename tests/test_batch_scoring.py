"""Batch scoring on the small real pipeline: every active user, top-N distinct items, offline features at a timestamp;
the users-only bulk path against the get_historical_features path; the vectorised user path on real rows."""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from propensity.assembly import user_matrix
from propensity.catalog import Catalog
from propensity.feature_store import open_store
from propensity.model_registry import load_version
from propensity.settings import CandidateSettings, ServerSettings, Settings
from propensity.user_state import UserBatch, UserState
from server.item_cache import StaticCatalog
from server.model_pool import ModelPool
from server.online_features import OnlineUserFeatures
from server.recommender import Recommender
from tests.conftest import BIN, Pipeline
from tests.test_user_batch import assert_same_state, reference_state, reference_vector
from training import offline_user_features as offline
from training.batch_scoring import _prefetched, active_users, score_batch, score_users_batch
from training.prepare import load_prepared

QUIET = lambda _: None  # noqa: E731


def _settings(pipeline: Pipeline) -> Settings:
    return Settings(work_dir=pipeline.work_dir, feature_repo=pipeline.feature_repo, data_dir=pipeline.data_dir)


def _catalog(settings: Settings) -> Catalog:
    items = pd.read_parquet(settings.prepared_dir / "items.parquet", columns=["item_id"])["item_id"].astype(str)
    return Catalog.from_frame(pd.DataFrame({"item_id": items.iloc[: len(items) * 4 // 5]}))  # some recent items unknown


@pytest.mark.slow
def test_score_batch_writes_top_items_for_every_active_user(pipeline, tmp_path: Path) -> None:
    settings = _settings(pipeline)
    at = load_prepared(settings.prepared_dir).as_of
    out = tmp_path / "scores.parquet"
    summary = score_batch(settings, at, out, top_n=5, chunk_size=200, progress=QUIET)
    frame = pd.read_parquet(out)
    expected = set(active_users(settings.prepared_dir, at))
    assert set(frame["user_id"]) == expected and summary.users == len(expected)
    assert frame.groupby("user_id")["rank"].max().le(5).all()
    assert not frame.duplicated(["user_id", "item_id"]).any()
    assert frame["propensity"].between(0, 1).all() and frame["item_score"].between(0, 1).all()
    # Items are in descending score order within each user.
    assert frame.groupby("user_id")["item_score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 1e-12))).all()
    bundle = load_version(settings.model_dir)
    assert frame["propensity"].mean() == pytest.approx(bundle.base_rate, abs=0.15)


@pytest.mark.slow
def test_users_only_equals_the_get_historical_features_path(pipeline, tmp_path: Path) -> None:
    """Same users, same propensities: DuckDB's streamed point-in-time rows are Feast's get_historical_features rows."""
    settings = _settings(pipeline)
    at = load_prepared(settings.prepared_dir).as_of
    lines: list[str] = []
    fast = score_users_batch(settings, at, tmp_path / "users.parquet", chunk_size=128, progress=lines.append)
    score_batch(settings, at, tmp_path / "full.parquet", top_n=1, progress=QUIET)
    users = pd.read_parquet(tmp_path / "users.parquet")
    full = pd.read_parquet(tmp_path / "full.parquet").drop_duplicates("user_id")[["user_id", "propensity"]]
    assert sorted(users["user_id"]) == sorted(full["user_id"]) == active_users(settings.prepared_dir, at)  # each user once
    merged = users.merge(full, on="user_id", suffixes=("", "_full"))
    np.testing.assert_allclose(merged["propensity"], merged["propensity_full"], rtol=0, atol=1e-9)
    assert merged["propensity"].nunique() > len(merged) // 2  # real scores, not the base rate
    # Written chunk by chunk (one row group per record batch of at most 128 users), with a progress line each.
    metadata = pq.ParquetFile(tmp_path / "users.parquet").metadata
    assert metadata.num_row_groups >= -(-fast.users // 128) > 1
    assert max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) <= 128
    assert sum("scored" in line for line in lines) == metadata.num_row_groups


@pytest.mark.slow
@pytest.mark.parametrize("shift", [timedelta(days=-9, hours=-5, seconds=-7), timedelta(days=95)], ids=["mid-day", "activity-expired"])
def test_users_only_equals_historical_features_at_other_times(pipeline, tmp_path: Path, shift: timedelta) -> None:
    """Between snapshots, and past user_activity's 90-day TTL (profile values still valid), for given ids incl. unknown."""
    settings = _settings(pipeline)
    at = load_prepared(settings.prepared_dir).as_of + shift
    events = pd.read_parquet(settings.prepared_dir / "events.parquet", columns=["user_id"])["user_id"]
    users = events.drop_duplicates().sample(120, random_state=3).tolist() + ["nobody-1", "nobody-2"]
    score_users_batch(settings, at, tmp_path / "u.parquet", users=users, progress=QUIET)
    score_batch(settings, at, tmp_path / "f.parquet", top_n=1, users=users, progress=QUIET)
    fast = pd.read_parquet(tmp_path / "u.parquet").set_index("user_id")["propensity"]
    full = pd.read_parquet(tmp_path / "f.parquet").drop_duplicates("user_id").set_index("user_id")["propensity"]
    assert sorted(fast.index) == sorted(full.index) == sorted(users)
    np.testing.assert_allclose(fast.loc[full.index], full, rtol=0, atol=1e-9)
    assert fast.loc["nobody-1"] == load_version(settings.model_dir).base_rate


@pytest.mark.slow
def test_score_batch_users_only_from_the_cli(pipeline, tmp_path: Path) -> None:
    out = tmp_path / "cli.parquet"
    result = subprocess.run([str(BIN / "propensity"), "score-batch", "--users-only", "--out", str(out)], env=pipeline.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "users/s" in result.stdout
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["user_id", "propensity"] and frame["propensity"].between(0, 1).all()
    assert sorted(frame["user_id"]) == active_users(_settings(pipeline).prepared_dir, load_prepared(_settings(pipeline).prepared_dir).as_of)
    # The command imports Feast without its run-time type checks and LightGBM without scikit-learn
    # (training.lean_startup): same propensities as this process, which imported both the ordinary way.
    assert "feast" in sys.modules
    settings = _settings(pipeline)
    score_users_batch(settings, load_prepared(settings.prepared_dir).as_of, tmp_path / "here.parquet", progress=QUIET)
    here = pd.read_parquet(tmp_path / "here.parquet").set_index("user_id")["propensity"]
    np.testing.assert_allclose(frame.set_index("user_id")["propensity"].loc[here.index], here, rtol=0, atol=1e-12)


def test_skipping_feasts_type_checks_leaves_other_modules_checked(tmp_path: Path) -> None:
    """Run in a fresh interpreter: Feast's classes are not instrumented, anyone else's still are."""
    code = (
        "from training.lean_startup import skip_feast_type_checks\n"
        "import sys; assert 'feast' not in sys.modules\n"
        "skip_feast_type_checks()\n"
        "import feast, inspect, typeguard\n"
        "from feast.feature_service import FeatureService\n"
        "assert 'TypeCheckMemo' not in str(FeatureService.__init__.__code__.co_names), 'feast still instrumented'\n"
        "@typeguard.typechecked\n"
        "def f(x: int) -> int:\n"
        "    return x\n"
        "try:\n"
        "    f('a')\n"
        "except typeguard.TypeCheckError:\n"
        "    print('checked')\n"
    )
    script = tmp_path / "check.py"  # a file: typeguard instruments functions from their source
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked"


def _score_batch_in_a_fresh_interpreter(pipeline: Pipeline, out: Path) -> list[str]:
    """`propensity score-batch --users-only` as the CLI runs it, in a new interpreter; what it had imported afterwards."""
    code = (
        "import sys\n"
        "from propensity_cli.main import main\n"
        f"rc = main(['score-batch', '--users-only', '--out', {str(out)!r}])\n"
        "feast = 'feast' in sys.modules\n"
        "import lightgbm.compat\n"
        "from feast.feature_service import FeatureService\n"
        "print('RESULT', rc, feast, 'sklearn' in sys.modules, lightgbm.compat.SKLEARN_INSTALLED,\n"
        "      'TypeCheckMemo' in str(FeatureService.__init__.__code__.co_names), 'ibis' in sys.modules)\n"
        "import sklearn.base  # hidden only while LightGBM was imported\n"
        "print('SKLEARN', sklearn.base.BaseEstimator.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**pipeline.env, "PYTHONPATH": str(Path(__file__).parents[1])},
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith(("RESULT", "SKLEARN"))]


@pytest.mark.slow
def test_score_batch_command_starts_lean(pipeline, tmp_path: Path) -> None:
    """The command imports LightGBM without scikit-learn and never Feast's offline store (ibis). The first run reads
    the registry through Feast (without typeguard's instrumentation) and records what it read; a run on the same
    registry recalls the record and does not import Feast at all. Same propensities each time, every active user."""
    settings = _settings(pipeline)
    memo = settings.work_dir / "cache" / "registry"
    shutil.rmtree(memo, ignore_errors=True)
    first = _score_batch_in_a_fresh_interpreter(pipeline, tmp_path / "first.parquet")
    assert first == ["RESULT 0 True False False False False", "SKLEARN BaseEstimator"]
    assert len(list(memo.glob("*.json"))) == 1
    second = _score_batch_in_a_fresh_interpreter(pipeline, tmp_path / "second.parquet")
    assert second == ["RESULT 0 False False False False False", "SKLEARN BaseEstimator"]
    # A record whose fingerprint no longer matches the model is not trusted: the run reads through Feast again.
    record = next(memo.glob("*.json"))
    record.write_text(record.read_text().replace('"fingerprint": "', '"fingerprint": "stale'))
    third = _score_batch_in_a_fresh_interpreter(pipeline, tmp_path / "third.parquet")
    assert third[0].startswith("RESULT 0 True ")
    frames = [pd.read_parquet(tmp_path / f"{name}.parquet").set_index("user_id")["propensity"].sort_index() for name in ("first", "second", "third")]
    assert sorted(frames[0].index) == active_users(settings.prepared_dir, load_prepared(settings.prepared_dir).as_of)
    for frame in frames[1:]:
        pd.testing.assert_series_equal(frame, frames[0])


def test_lightgbm_imported_without_sklearn_still_loads_and_predicts(tmp_path: Path) -> None:
    """In a fresh interpreter: the Booster a model file holds predicts the same without scikit-learn imported."""
    model_file = tmp_path / "model.txt"
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from training.lean_startup import import_lightgbm_without_sklearn\n"
        "import_lightgbm_without_sklearn()\n"
        "import lightgbm as lgb\n"
        "assert 'sklearn' not in sys.modules and not lgb.compat.SKLEARN_INSTALLED\n"
        "rng = np.random.default_rng(3)\n"
        "x = rng.normal(size=(500, 4)); y = (x[:, 0] + rng.normal(size=500) > 0).astype(int)\n"
        "booster = lgb.train({'objective': 'binary', 'verbose': -1}, lgb.Dataset(x, y), num_boost_round=5)\n"
        f"booster.save_model({str(model_file)!r})\n"
        "print(' '.join(f'{v:.12f}' for v in lgb.Booster(model_file=" + repr(str(model_file)) + ").predict(x[:3])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    import lightgbm as lgb  # this process: the ordinary import, with scikit-learn

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4))
    expected = lgb.Booster(model_file=str(model_file)).predict(x[:3])
    np.testing.assert_allclose([float(v) for v in result.stdout.split()], expected, rtol=0, atol=1e-12)


def _online_rows(pipeline: Pipeline, users: list[str]) -> list[dict]:
    store = open_store(pipeline.feature_repo)
    bundle = load_version(_settings(pipeline).model_dir)
    return OnlineUserFeatures(store, bundle.user_feature_service).fetch(users)


def _historical_rows(pipeline: Pipeline, users: list[str], at) -> list[dict]:
    store = open_store(pipeline.feature_repo)
    bundle = load_version(_settings(pipeline).model_dir)
    entity = pd.DataFrame({"user_id": users, "event_timestamp": pd.Timestamp(at)})
    frame = store.get_historical_features(entity_df=entity, features=store.get_feature_service(bundle.user_feature_service)).to_df()
    return frame.set_index("user_id").reindex(users).reset_index().to_dict("records")


@pytest.mark.slow
def test_real_rows_give_the_reference_states_and_inputs_on_every_path(pipeline) -> None:
    """Online rows (with TTLs applied) and point-in-time rows, incl. expired views and unknown users."""
    settings = _settings(pipeline)
    catalog = _catalog(settings)
    as_of = load_prepared(settings.prepared_dir).as_of
    users = pd.read_parquet(settings.prepared_dir / "events.parquet", columns=["user_id"])["user_id"].drop_duplicates().tolist()
    users = users[:400] + ["nobody-1", "nobody-2"]
    sources = {
        "online": (_online_rows(pipeline, users), as_of.timestamp() + 3600),
        "historical": (_historical_rows(pipeline, users, as_of - timedelta(days=3, hours=4)), (as_of - timedelta(days=3, hours=4)).timestamp()),
        "expired": (_historical_rows(pipeline, users, as_of + timedelta(days=95)), (as_of + timedelta(days=95)).timestamp()),
    }
    for name, (rows, now) in sources.items():
        expected = [reference_state(u, r, catalog) for u, r in zip(users, rows)]
        batch = UserBatch.from_rows(users, rows, catalog)
        np.testing.assert_array_equal(user_matrix(batch, now), np.vstack([reference_vector(s, now) for s in expected]), err_msg=name)
        for i, (user, row) in enumerate(zip(users, rows)):
            assert_same_state(UserState.from_row(user, row, catalog), expected[i])
            assert_same_state(batch.user(i), expected[i])
        assert not expected[-1].known
    assert not any(s for s in (reference_state(u, r, catalog).has_history for u, r in zip(users, sources["expired"][0])))
    # The streamed Arrow batches of the same point-in-time rows give the same inputs as Feast's DataFrame rows.
    store = open_store(pipeline.feature_repo)
    tables = offline.service_tables(store, load_version(settings.model_dir).user_feature_service)
    at = as_of - timedelta(days=3, hours=4)
    con = offline.connect()
    offline.set_users(con, users)
    record_batches = list(offline.user_feature_batches(con, tables, at, 150))
    arrow_ids = [u for b in record_batches for u in b.column("user_id").to_pylist()]
    arrow = np.vstack([user_matrix(UserBatch(b.column("user_id"), {n: b.column(n) for n in b.schema.names}, catalog), at.timestamp()) for b in record_batches])
    order = {u: i for i, u in enumerate(users)}
    rows = sources["historical"][0]
    expected = np.vstack([reference_vector(reference_state(u, rows[order[u]], catalog), at.timestamp()) for u in arrow_ids])
    assert sorted(arrow_ids) == sorted(users) and len(record_batches) >= 3
    np.testing.assert_array_equal(arrow, expected)


@pytest.mark.slow
def test_score_users_in_process_equals_per_user_scoring(pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data plane: one bulk read per chunk, vectorised assembly, the same numbers as scoring each user alone."""
    settings = _settings(pipeline)
    catalog = _catalog(settings)
    users = pd.read_parquet(settings.prepared_dir / "events.parquet", columns=["user_id"])["user_id"].drop_duplicates().tolist()[:230]
    users = [*users[:100], "nobody", *users[100:]]
    store = open_store(pipeline.feature_repo)
    bundle = load_version(settings.model_dir)
    features = OnlineUserFeatures(store, bundle.user_feature_service)
    reads: list[int] = []

    class Counted:
        def __getattr__(self, name):
            method = getattr(features, name)

            def read(ids):
                reads.append(len(ids))
                return method(ids)

            return read

    pool = ModelPool(settings.model_dir, lambda _: None)
    recommender = Recommender(pool, Counted(), StaticCatalog(catalog), CandidateSettings(), ServerSettings())
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)  # the data plane's clock: ages are measured from it
    result = asyncio.run(recommender.score_users(users, chunk=100))
    assert reads == [100, 100, 31]  # one read per chunk
    assert result.user_ids == users and result.unknown == [u == "nobody" for u in users]
    rows = features.fetch(users)
    singles = [bundle.predict_users(reference_vector(reference_state(u, r, catalog), now)[None, :])[0] for u, r in zip(users, rows)]
    expected = [s if u != "nobody" else bundle.base_rate for u, s in zip(users, singles)]
    np.testing.assert_allclose(result.propensities, expected, rtol=0, atol=1e-12)


def test_prefetched_keeps_order_and_bounds_what_is_in_flight() -> None:
    produced: list[int] = []

    def numbers():
        for i in range(50):
            produced.append(i)
            yield i

    with _prefetched(numbers(), depth=1) as items:
        seen = []
        for item in items:
            seen.append(item)
            assert len(produced) - len(seen) <= 2  # the one in the queue and the one being produced
    assert seen == list(range(50))


def test_prefetched_raises_the_producers_error_and_stops_when_the_consumer_fails() -> None:
    def failing():
        yield 1
        raise ValueError("bad table")

    with pytest.raises(ValueError, match="bad table"), _prefetched(failing()) as items:
        list(items)
    produced: list[int] = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    with pytest.raises(RuntimeError), _prefetched(endless()) as items:
        for item in items:
            if item == 3:
                raise RuntimeError("scoring failed")
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count  # the producer has stopped
