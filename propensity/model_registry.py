"""Model versions on disk: save a version, promote one to current atomically, load by version.

Layout: <root>/versions/<version>/{user_propensity.txt, item_ranker.txt, metadata.json}
and <root>/CURRENT holding the current version id.

The registry is a shared directory that people and jobs change under a running server, so
everything read from it is checked before LightGBM sees it: the version id in CURRENT (a plain
token, never a path), the metadata's shape, and each model file against the SHA-256 recorded
when it was saved (older versions without one: the file must end the way LightGBM writes it).
A truncated model file must never reach LightGBM: its parser aborts the whole process on some
truncations instead of raising. Every problem is a ModelLoadError that names the file.

The root is a local directory, or the local mirror of an fsspec URL (settings.model_registry_root,
propensity/registry_remote.py): then reads pull CURRENT and download the versions they need (once: a
version is immutable), and writes push the version (files, metadata.json last) before the pointer.
A plain local root never touches fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

import lightgbm as lgb
import numpy as np

from propensity import compiled as compiled_trees
from propensity import registry_remote
from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES

USER_MODEL = "user_propensity"
RANKER_MODEL = "item_ranker"
EXPECTED_FEATURES = {USER_MODEL: USER_MODEL_FEATURES, RANKER_MODEL: RANKER_FEATURES}
METADATA = "metadata.json"
CURRENT = "CURRENT"
# What a version id may look like (new_version_id's "v20261128T051500", or any plain token): never a path.
VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
# The last line LightGBM's save_model writes: a file without it was cut short.
_LIGHTGBM_LAST_LINE = "pandas_categorical:"


class ModelLoadError(RuntimeError):
    """A model version is missing, unreadable or does not match the code's feature layout."""


@dataclass(frozen=True)
class RankerScores:
    """The ranker's scores for a batch of items, from one model call.

    raw is LightGBM's raw score (log-odds for the binary objective, the ranking score for lambdarank):
    it is the ranking order. calibrated is the served probability: the objective's output transform and
    the stored calibration applied to raw, both non-decreasing, so calibrated never reverses the raw order
    (an isotonic map can tie items whose raw scores differ, which is why ranking uses raw).
    """

    raw: np.ndarray
    calibrated: np.ndarray


@dataclass(frozen=True)
class ModelBundle:
    """The two models of one version with their metadata; predictions are probabilities."""

    version: str
    metadata: dict
    user_model: lgb.Booster
    ranker: lgb.Booster
    num_threads: int = 1
    directory: Path | None = None
    # Verified compiled predictors by model name; filled after load (possibly in the background).
    compiled: dict[str, compiled_trees.CompiledModel] = field(default_factory=dict)

    def predict_users(self, features: np.ndarray) -> np.ndarray:
        if not len(features):
            return np.empty(0)
        fast = self.compiled.get(USER_MODEL)
        raw = fast.predict(features) if fast else self.user_model.predict(features, num_threads=self.num_threads)
        return apply_calibration(self.calibration(USER_MODEL), raw)

    def predict_items(self, features: np.ndarray) -> np.ndarray:
        """Calibrated purchase probabilities per (user, item) row."""
        return self.score_items(features).calibrated

    def score_items(self, features: np.ndarray) -> RankerScores:
        """Raw and calibrated ranker scores per (user, item) row, from one model call (compiled or LightGBM)."""
        if not len(features):
            return RankerScores(np.empty(0), np.empty(0))
        fast = self.compiled.get(RANKER_MODEL)  # compiled with raw_score=True (see compile)
        raw = fast.predict(features) if fast else self.ranker.predict(features, raw_score=True, num_threads=self.num_threads)
        raw = np.asarray(raw, dtype=float)
        return RankerScores(raw, apply_calibration(self.calibration(RANKER_MODEL), self._ranker_output(raw)))

    def calibration(self, name: str) -> dict | None:
        """The calibration map stored with a model (None: its outputs are used as they are)."""
        return self.metadata["models"].get(name, {}).get("calibration")

    @property
    def backend(self) -> str:
        """'compiled' when both models run compiled, else 'lightgbm'."""
        return "compiled" if len(self.compiled) == 2 else "lightgbm"

    def compile(self, names: Collection[str] = (USER_MODEL, RANKER_MODEL)) -> bool:
        """Build or load the cached compiled predictors of the models named; attach those that match LightGBM.

        True when both models run compiled (a caller that needs one model only names it, e.g. score-batch --users-only:
        loading a compiled build parses its model file and checks it against LightGBM, ~0.1-0.5 s per model).
        """
        if self.directory is None:
            return False
        for name, booster in ((USER_MODEL, self.user_model), (RANKER_MODEL, self.ranker)):
            if name in names and name not in self.compiled:
                model = compiled_trees.compile_model(
                    self.directory / f"{name}.txt", booster, self.directory / "compiled", raw_score=name in _RAW_COMPILED
                )
                if model is not None:
                    self.compiled[name] = model
        return self.backend == "compiled"

    def has_compiled_cache(self, names: Collection[str] = (USER_MODEL, RANKER_MODEL)) -> bool:
        """Whether the models named have a compiled build cached on disk."""
        return self.directory is not None and all(
            compiled_trees.cache_path(self.directory / f"{name}.txt", self.directory / "compiled", raw_score=name in _RAW_COMPILED).exists()
            for name in names
        )

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """Per-input ranker contributions in log-odds; the last column is the baseline, rows sum to the raw score."""
        return self.ranker.predict(features, pred_contrib=True, num_threads=self.num_threads)

    @cached_property
    def _ranker_output(self) -> Callable[[np.ndarray], np.ndarray]:
        """The ranker objective's transform of raw scores into its native output (what calibration was fitted on)."""
        return output_transform(self.ranker)

    @property
    def base_rate(self) -> float:
        """Share of users who bought in the training period: the propensity of an unknown user."""
        return float(self.metadata["models"][USER_MODEL]["base_rate"])

    @property
    def user_feature_service(self) -> str:
        return self.metadata["feature_services"]["user"]["name"]

    @property
    def item_feature_service(self) -> str:
        return self.metadata["feature_services"]["item"]["name"]


# The ranker is compiled to return raw scores: score_items needs them, and derives probabilities itself.
_RAW_COMPILED = frozenset({RANKER_MODEL})
_IDENTITY_OBJECTIVES = frozenset({"lambdarank", "rank_xendcg", "regression", "regression_l1", "huber", "fair", "quantile", "mape"})
_EXP_OBJECTIVES = frozenset({"poisson", "gamma", "tweedie"})


def output_transform(booster: lgb.Booster) -> Callable[[np.ndarray], np.ndarray]:
    """What LightGBM's predict applies to raw scores for the booster's objective (non-decreasing for every supported one)."""
    header = next((line for line in booster.model_to_string(num_iteration=1).splitlines() if line.startswith("objective=")), "objective=")
    name, *options = header.removeprefix("objective=").split()
    settings = dict(option.split(":", 1) for option in options if ":" in option)
    if name == "binary":
        slope = float(settings.get("sigmoid", 1.0))
        return lambda raw: 1.0 / (1.0 + np.exp(-slope * raw))
    if name in ("cross_entropy", "xentropy"):
        return lambda raw: 1.0 / (1.0 + np.exp(-raw))
    if name in _EXP_OBJECTIVES:
        return np.exp
    if name in _IDENTITY_OBJECTIVES:
        return lambda raw: raw
    raise ModelLoadError(f"ranker objective {name or '(none)'!r} is not supported for serving (its output transform is unknown)")


def check_monotone_calibration(calibration: dict | None) -> None:
    """Refuse a calibration map that can decrease: served scores must never reverse the ranker's order."""
    if not calibration or calibration.get("method", "none") == "none":
        return
    method = calibration["method"]
    if method == "platt" and calibration["a"] < 0:
        raise ModelLoadError(f"ranker Platt calibration has a negative slope ({calibration['a']}): it would reverse the ranking")
    if method == "isotonic" and (np.any(np.diff(calibration["x"]) < 0) or np.any(np.diff(calibration["y"]) < 0)):
        raise ModelLoadError("ranker isotonic calibration is not non-decreasing: it would reverse the ranking")


def apply_calibration(calibration: dict | None, scores: np.ndarray) -> np.ndarray:
    """Map model outputs to probabilities with a stored calibration; None or {"method": "none"} leaves them unchanged.

    - {"method": "platt", "a": a, "b": b, "input": "probability" | "raw"}: sigmoid(a * z + b), where z is
      logit(score) for probability outputs (binary objective) and the score itself for raw ones (lambdarank).
    - {"method": "isotonic", "x": [...], "y": [...]}: piecewise-linear through the isotonic breakpoints,
      clipped to the end values (what scikit-learn's IsotonicRegression predicts with out_of_bounds="clip").
    """
    if not calibration or calibration.get("method", "none") == "none":
        return scores
    scores = np.asarray(scores, dtype=float)
    method = calibration["method"]
    if method == "platt":
        z = scores
        if calibration.get("input", "probability") == "probability":
            clipped = np.clip(scores, 1e-15, 1 - 1e-15)
            z = np.log(clipped / (1 - clipped))
        return 1.0 / (1.0 + np.exp(-(calibration["a"] * z + calibration["b"])))
    if method == "isotonic":
        return np.interp(scores, np.asarray(calibration["x"], dtype=float), np.asarray(calibration["y"], dtype=float))
    raise ModelLoadError(f"unknown calibration method {method!r}")


class ContinuationError(RuntimeError):
    """Training was asked to continue a model version whose feature services have since changed."""


def check_continuation(root: Path, version: str, current: dict[str, dict[str, str]]) -> dict:
    """Refuse to continue `version` when its feature services (name and fingerprint) differ from `current`; return its metadata.

    current is shaped like metadata["feature_services"]: {"user": {"name", "fingerprint"}, "item": {...}}.
    """
    path = root / "versions" / version / METADATA
    try:
        ensure_local_version(root, version)
        metadata = json.loads(path.read_text())
    except (FileNotFoundError, ModelLoadError):
        raise ContinuationError(f"{path.parent}: cannot continue model version {version}: not found") from None
    previous = metadata.get("feature_services", {})
    changed = [
        f"{role} service {previous.get(role, {}).get('name')!r} fingerprint {previous.get(role, {}).get('fingerprint')} -> "
        f"{current[role]['name']!r} fingerprint {current[role]['fingerprint']}"
        for role in current
        if previous.get(role, {}).get("name") != current[role]["name"] or previous.get(role, {}).get("fingerprint") != current[role]["fingerprint"]
    ]
    if changed:
        raise ContinuationError(
            f"cannot continue model version {version}: its features changed since it was trained ({'; '.join(changed)}). "
            "Train a new model without continue_from, or publish the change as a new _vN feature service."
        )
    return metadata


def new_version_id(now: datetime | None = None) -> str:
    """Sortable version ids, e.g. v20261128T051500."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("v%Y%m%dT%H%M%S")


def save_version(root: Path, version: str, boosters: dict[str, lgb.Booster], metadata: dict) -> Path:
    """Write a new version directory (never overwrites) and return it."""
    final = root / "versions" / version
    remote = registry_remote.remote_for(root)
    if final.exists() or (remote is not None and remote.exists(f"versions/{version}/{METADATA}")):
        raise FileExistsError(f"{final}: model version {version} already exists")
    staging = root / "versions" / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, booster in boosters.items():
        booster.save_model(str(staging / f"{name}.txt"))
        metadata["models"][name]["file"] = f"{name}.txt"
        metadata["models"][name]["sha256"] = file_sha256(staging / f"{name}.txt")
    (staging / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    staging.rename(final)
    if remote is not None:
        _publish_version(root, version, remote)
    return final


def _publish_version(root: Path, version: str, remote: registry_remote.Remote) -> None:
    """Upload a local version's files the URL lacks, metadata.json last: a version with metadata there is complete."""
    directory = root / "versions" / version
    present = set(remote.children(f"versions/{version}", "file"))
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))  # not compiled/: built per machine
    for path in sorted(files, key=lambda p: p.name == METADATA):
        if path.name not in present:
            remote.upload(path, f"versions/{version}/{path.name}")


def ensure_local_version(root: Path, version: str) -> None:
    """For a URL root: download a version the local mirror lacks, its model files checked against metadata.json's sha256.

    A no-op for a plain root, for a version already mirrored (immutable), and for one the URL does not have
    complete (no metadata.json yet): the caller then reports it as missing.
    """
    if registry_remote.remote_url(root) is None or (root / "versions" / version / METADATA).exists():
        return
    check_version_id(version)
    try:
        remote = registry_remote.Remote(registry_remote.remote_url(root) or "")
        raw = remote.read(f"versions/{version}/{METADATA}")
        if raw is None:
            return
        staging = root / "versions" / f".{version}.{os.getpid()}.{threading.get_ident()}.download"
        registry_remote.discard(staging)
        staging.mkdir(parents=True)
        try:
            for name in remote.children(f"versions/{version}", "file"):
                if name != METADATA and not name.startswith("."):
                    remote.download(f"versions/{version}/{name}", staging / name)
            (staging / METADATA).write_bytes(raw)  # last: a mirrored version with metadata is complete here too
            _check_download(staging, raw, f"{remote.url}/versions/{version}")
            try:
                staging.rename(root / "versions" / version)
            except OSError:  # another process sharing this cache mirrored it first
                if not (root / "versions" / version / METADATA).exists():
                    raise
        finally:
            registry_remote.discard(staging)
    except registry_remote.RemoteRegistryError as error:
        raise ModelLoadError(str(error)) from None


def _check_download(directory: Path, raw: bytes, source: str) -> None:
    try:
        metadata = json.loads(raw)
        models = metadata["models"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{source}/{METADATA}: unreadable model metadata: {error}") from None
    for name, info in models.items():
        if isinstance(info, dict) and isinstance(info.get("file"), str) and info.get("sha256"):
            path = directory / Path(info["file"]).name
            if not path.exists() or file_sha256(path) != info["sha256"]:
                raise ModelLoadError(f"{source}/{info['file']}: missing or differs from the sha256 in its metadata: not mirrored")


def promote(root: Path, version: str) -> None:
    """Make version the current one; readers see the old or the new pointer, never a partial one.

    Local root: CURRENT is written aside and renamed over (os.replace). URL root: the version is made complete at
    the URL first, then CURRENT is replaced with one write (one PUT on an object store), then the local mirror's.
    """
    ensure_local_version(root, version)
    if not (root / "versions" / version / METADATA).exists():
        raise ModelLoadError(f"{root}: no model version {version} to promote")
    remote = registry_remote.remote_for(root)
    if remote is not None:
        try:
            _publish_version(root, version, remote)
            remote.write(CURRENT, (version + "\n").encode())
        except registry_remote.RemoteRegistryError as error:
            raise ModelLoadError(f"cannot promote {version}: {error}") from None
        registry_remote.write_local(root / CURRENT, (version + "\n").encode())
        return
    tmp = root / f".{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT)


def current_version(root: Path) -> str:
    """The version id CURRENT names; ModelLoadError when CURRENT is missing, unreadable or not a version id."""
    path = root / CURRENT
    try:
        registry_remote.pull_file(root, CURRENT)  # a URL root: the mirror's pointer becomes the URL's (no-op for a local root)
    except registry_remote.RemoteRegistryError as error:
        raise ModelLoadError(str(error)) from None
    try:
        raw = path.read_bytes()[:1024]
    except FileNotFoundError:
        raise ModelLoadError(f"{root}: no current model; train one with `propensity train`") from None
    except OSError as error:
        raise ModelLoadError(f"{path}: unreadable: {error}") from None
    try:
        version = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a version id (binary content {raw[:32]!r})") from None
    check_version_id(version, path)
    return version


def check_version_id(version: str, source: object = "model version") -> None:
    """Refuse anything but a plain version token (no paths, no control characters, not empty)."""
    if not VERSION_ID.fullmatch(version):
        raise ModelLoadError(f"{source}: {version[:64]!r} is not a version id")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: Path, sha256: str | None) -> None:
    """Refuse a model file that is missing, changed since it was saved, or cut short, before LightGBM parses it."""
    try:
        if sha256 is not None:
            actual = file_sha256(path)
            if actual != sha256:
                raise ModelLoadError(f"{path}: cannot load LightGBM model: content differs from the one saved (sha256 {actual[:12]}, expected {sha256[:12]}): half-written or changed")
            return
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - 4096))
            tail = file.read().decode("utf-8", "replace").rstrip().rsplit("\n", 1)[-1]
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: cannot load LightGBM model: file missing") from None
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot load LightGBM model: {error}") from None
    if not tail.startswith(_LIGHTGBM_LAST_LINE):
        raise ModelLoadError(f"{path}: cannot load LightGBM model: it does not end like one (cut short, half-written?)")


def list_versions(root: Path) -> list[str]:
    """Version ids in the registry (for a URL root: the complete ones there, mirrored; the mirror's when it is unreachable)."""
    with contextlib.suppress(registry_remote.RemoteRegistryError):  # unreachable: list what is mirrored, never fail a listing
        remote = registry_remote.remote_for(root)
        for version in remote.children("versions", "directory") if remote is not None else ():
            if VERSION_ID.fullmatch(version):
                with contextlib.suppress(ModelLoadError):  # a damaged version is refused when it is loaded, by name
                    ensure_local_version(root, version)
    versions = root / "versions"
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")) if versions.exists() else []


def load_version(root: Path, version: str | None = None, num_threads: int = 1) -> ModelBundle:
    """Load a version (default: current) and check that its feature lists match the code's layout."""
    version = version or current_version(root)
    check_version_id(version)
    ensure_local_version(root, version)
    directory = root / "versions" / version
    try:
        metadata = json.loads((directory / METADATA).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{directory}: model version {version} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{directory / METADATA}: unreadable model metadata: {error}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("models"), dict):
        raise ModelLoadError(f"{directory / METADATA}: not model metadata (no 'models' object)")
    boosters = {}
    for name, expected in EXPECTED_FEATURES.items():
        info = metadata["models"].get(name)
        if info is None:
            raise ModelLoadError(f"{directory}: metadata has no model {name!r}")
        if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not isinstance(info.get("feature_names"), list):
            raise ModelLoadError(f"{directory / METADATA}: model {name!r} lacks 'file' or 'feature_names'")
        model_file = directory / info["file"]
        if model_file.parent != directory:
            raise ModelLoadError(f"{directory / METADATA}: model {name!r} file {info['file']!r} is outside the version directory")
        check_model_file(model_file, info.get("sha256"))
        try:
            booster = lgb.Booster(model_file=str(model_file))
        except lgb.basic.LightGBMError as error:
            raise ModelLoadError(f"{model_file}: cannot load LightGBM model: {error}") from None
        if list(info["feature_names"]) != list(expected) or booster.feature_name() != list(expected):
            missing = sorted(set(expected) - set(booster.feature_name()))
            extra = sorted(set(booster.feature_name()) - set(expected))
            detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same features in a different order"
            raise ModelLoadError(
                f"{directory}: model {name} was trained on a different feature layout ({detail}); retrain it with this code"
            )
        boosters[name] = booster
    check_monotone_calibration(metadata["models"][RANKER_MODEL].get("calibration"))
    bundle = ModelBundle(version, metadata, boosters[USER_MODEL], boosters[RANKER_MODEL], num_threads, directory)
    bundle._ranker_output  # noqa: B018 - an unsupported ranker objective is refused at load, not on a request
    return bundle
