"""Tests for the settings object: defaults, a TOML file, PROPENSITY_* environment variables."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from propensity.settings import PROJECT_ROOT, Settings, settings_from_args


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No developer PROPENSITY_* variables, and a working directory without a propensity.toml."""
    for name in list(os.environ):
        if name.startswith("PROPENSITY_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_defaults() -> None:
    settings = Settings()
    assert settings.server.port == 50051
    assert settings.server.max_num_items == 100
    assert settings.candidates.max_candidates == 200
    assert settings.user_feature_service == "propensity_user_v2"
    assert settings.work_dir == PROJECT_ROOT / "var"
    assert settings.model_dir == PROJECT_ROOT / "var" / "models"
    assert settings.as_of is None


def test_environment_variables_with_nested_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROPENSITY_SERVER__PORT", "6000")
    monkeypatch.setenv("PROPENSITY_CANDIDATES__MAX_CANDIDATES", "25")
    monkeypatch.setenv("PROPENSITY_WORK_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("PROPENSITY_REBASE_TO_NOW", "false")
    settings = Settings()
    assert settings.server.port == 6000
    assert settings.server.host == "localhost"  # the rest of the section keeps its defaults
    assert settings.candidates.max_candidates == 25
    assert settings.work_dir == tmp_path / "w"
    assert settings.prepared_dir == tmp_path / "w" / "prepared"
    assert settings.rebase_to_now is False


def test_malformed_environment_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPENSITY_SERVER__PORT", "high")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_toml_file_in_the_working_directory(clean_environment: Path) -> None:
    (clean_environment / "propensity.toml").write_text(
        'item_feature_service = "propensity_item_v2"\n[server]\nport = 7001\n[training]\nlearning_rate = 0.1\n'
    )
    settings = Settings()
    assert settings.item_feature_service == "propensity_item_v2"
    assert settings.server.port == 7001
    assert settings.training.learning_rate == 0.1
    assert settings.training.num_leaves == 31


def test_environment_beats_toml_and_arguments_beat_both(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_environment / "propensity.toml").write_text("[server]\nport = 7001\nmax_num_items = 50\n")
    monkeypatch.setenv("PROPENSITY_SERVER__PORT", "6000")
    settings = Settings()
    assert (settings.server.port, settings.server.max_num_items) == (6000, 50)
    assert Settings(user_feature_service="x").user_feature_service == "x"



def test_command_line_options_override_the_rest(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPENSITY_SERVER__PORT", "6000")
    args = argparse.Namespace(data_dir="shop", work_dir=None, as_of="2024-03-01T00:00:00+00:00", port=7000)
    settings = settings_from_args(args)
    assert settings.data_dir == clean_environment / "shop"
    assert settings.work_dir == Settings().work_dir  # not given: left alone
    assert settings.as_of.isoformat() == "2024-03-01T00:00:00+00:00"
    assert settings.server.port == 7000
    assert settings_from_args(argparse.Namespace()).server.port == 6000  # a command without --port

def test_unknown_top_level_key_in_toml_is_rejected(clean_environment: Path) -> None:
    (clean_environment / "propensity.toml").write_text("feature_repository = '/tmp/repo'\n")
    with pytest.raises(ValidationError, match="feature_repository"):
        Settings()


def test_unknown_argument_is_rejected() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        Settings(bogus=1)


def test_unknown_key_in_a_toml_section_is_rejected(clean_environment: Path) -> None:
    # A typo must not silently leave the default in place (here the port).
    (clean_environment / "propensity.toml").write_text("[server]\nprot = 7001\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings()


def test_propensity_config_names_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A process that imported propensity.settings (the CLI, a test run) must still honour PROPENSITY_CONFIG.
    config = tmp_path / "elsewhere.toml"
    config.write_text("[server]\nport = 7002\n")
    monkeypatch.setenv("PROPENSITY_CONFIG", str(config))
    assert Settings().server.port == 7002


def test_propensity_config_set_before_start_up(tmp_path: Path, clean_environment: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[server]\nport = 7003\n[demo]\nn_users = 50\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")} | {"PROPENSITY_CONFIG": str(config)}
    result = subprocess.run(
        [sys.executable, "-c", "from propensity.settings import Settings; s = Settings(); print(s.server.port, s.demo.n_users)"],
        capture_output=True, text=True, env=env, cwd=clean_environment, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7003", "50"]


def test_describe_is_json_of_every_section() -> None:
    text = Settings().describe()
    for section in ('"demo"', '"features"', '"candidates"', '"training"', '"server"'):
        assert section in text
