"""training.registry_memo: the registry facts score-batch --users-only remembers, keyed by the registry's content."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from training import registry_memo
from training.offline_user_features import ViewTable

TABLES = [
    ViewTable("user_activity", Path("/data/offline/user_activity.parquet"), "user_id", "event_timestamp", "created",
              (("views_30d", "views_30d"), ("carts_30d", "carts_30d")), timedelta(days=90)),
    ViewTable("user_profile", Path("/data/offline/user_profile.parquet"), "uid", "ts", None, (("age", "age_years"),), None),
]


def _repo(tmp_path: Path, registry: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "feature_store.yaml").write_text(f"project: p\nprovider: local\n{registry}\nonline_store:\n  type: sqlite\n")
    return repo


def test_the_registry_file_feature_store_yaml_names(tmp_path: Path, monkeypatch) -> None:
    assert registry_memo.registry_file(_repo(tmp_path, "registry: data/registry.db")) == tmp_path / "repo" / "data" / "registry.db"
    assert registry_memo.registry_file(_repo(tmp_path, "registry:\n  registry_type: file\n  path: /abs/reg.db")) == Path("/abs/reg.db")
    monkeypatch.setenv("REG_DIR", "/from/env")
    assert registry_memo.registry_file(_repo(tmp_path, "registry: ${REG_DIR}/r.db")) == Path("/from/env/r.db")
    # Registries whose content is not a local file are never remembered.
    assert registry_memo.registry_file(_repo(tmp_path, "registry:\n  registry_type: sql\n  path: postgresql://h/db")) is None
    assert registry_memo.registry_file(_repo(tmp_path, "registry: s3://bucket/registry.db")) is None
    assert registry_memo.registry_file(tmp_path / "nowhere") is None


def test_the_key_follows_the_registrys_content_and_what_is_read(tmp_path: Path) -> None:
    registry = tmp_path / "registry.db"
    registry.write_bytes(b"one")
    key = registry_memo.record_key(registry, tmp_path, "propensity_user_v2", {"a", "b"})
    assert key == registry_memo.record_key(registry, tmp_path, "propensity_user_v2", ["b", "a"])
    assert key != registry_memo.record_key(registry, tmp_path, "propensity_user_v3", {"a", "b"})
    assert key != registry_memo.record_key(registry, tmp_path, "propensity_user_v2", {"a"})
    assert key != registry_memo.record_key(registry, tmp_path / "other", "propensity_user_v2", {"a", "b"})
    registry.write_bytes(b"two")  # a `feast apply` rewrote the registry
    assert key != registry_memo.record_key(registry, tmp_path, "propensity_user_v2", {"a", "b"})
    assert registry_memo.record_key(tmp_path / "missing.db", tmp_path, "s", None) is None


def test_a_record_comes_back_as_it_was_written(tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    assert registry_memo.recall(memo, "k") is None
    registry_memo.remember(memo, "k", TABLES, "0123abcd")
    assert registry_memo.recall(memo, "k") == (TABLES, "0123abcd")
    assert [p.name for p in memo.iterdir()] == ["k.json"]  # no partial file left behind


def test_a_damaged_record_is_not_used(tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    registry_memo.remember(memo, "k", TABLES, "0123abcd")
    (memo / "k.json").write_text('{"fingerprint": "0123abcd", "tables": [{"name": "x"}]}')
    assert registry_memo.recall(memo, "k") is None
    (memo / "k.json").write_text("{not json")
    assert registry_memo.recall(memo, "k") is None
