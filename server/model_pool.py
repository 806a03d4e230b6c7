"""The model versions a server answers with: current, A/B split, shadow, pins; hot reload on promotion."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from propensity.feature_store import FeatureContractError
from propensity.model_registry import ModelBundle, ModelLoadError, current_version, list_versions, load_version
from server.errors import ModelUnavailable, UnknownModelVersion

log = logging.getLogger(__name__)


def bucket(user_id: str) -> float:
    """A stable number in [0, 1) per user: the same user always lands in the same A/B arm."""
    return (zlib.crc32(user_id.encode()) % 10_000) / 10_000


class ModelPool:
    """Loads and validates model versions; every bundle it hands out passed its contract check."""

    def __init__(
        self,
        root: Path,
        check_contract: Callable[[ModelBundle], None],
        traffic_split: Mapping[str, float] | None = None,
        shadow_version: str = "",
        on_change: Callable[[ModelPool], None] | None = None,
        scoring_backend: str = "lightgbm",
    ) -> None:
        if scoring_backend not in ("lightgbm", "compiled", "auto"):
            raise ValueError(f"scoring_backend: expected lightgbm, compiled or auto, got {scoring_backend!r}")
        self._backend = scoring_backend
        self._root = root
        self._check = check_contract
        self._lock = threading.Lock()
        self._bundles: dict[str, ModelBundle] = {}
        self._on_change = on_change
        self.rejected: dict[str, str] = {}  # version -> why it was refused
        self.current = self._load(current_version(root))
        self._split = self._build_split(traffic_split or {})
        self.shadow = self._load(shadow_version) if shadow_version else None

    def get(self, version: str = "") -> ModelBundle:
        """A pinned version (loaded on first use), or the current one."""
        if not version or version == self.current.version:
            return self.current
        bundle = self._bundles.get(version)
        if bundle is not None:
            return bundle
        if version not in list_versions(self._root):
            raise UnknownModelVersion(f"model_version: no model version {version!r}; available: {', '.join(self.available())}")
        with self._lock:
            return self._bundles.get(version) or self._load(version)

    def choose(self, user_id: str, pinned: str = "") -> ModelBundle:
        """The version for a request: the pin if any, else the user's A/B arm, else current."""
        if pinned or not self._split:
            return self.get(pinned)
        point = bucket(user_id)
        for upper, bundle in self._split:
            if point < upper:
                return bundle
        return self._split[-1][1]

    def poll(self) -> ModelBundle | None:
        """A newly promoted version, loaded and validated, or None; blocking (file reads, model parsing): call it off the loop.

        Does not change what is served: hand the result to `install`. A version that fails to load or
        validate is refused once and logged, and None is returned.
        """
        try:
            promoted = current_version(self._root)
        except ModelLoadError as error:
            log.error("model registry unreadable, keeping %s: %s", self.current.version, error)
            return None
        if promoted == self.current.version or promoted in self.rejected:
            return None
        try:
            return self._load(promoted)
        except ModelUnavailable as error:
            self.rejected[promoted] = str(error)
            log.error("refusing promoted model %s, still serving %s: %s", promoted, self.current.version, error)
            return None

    def install(self, bundle: ModelBundle) -> None:
        """Serve `bundle` from now on (hot reload): one assignment, cheap enough for the event loop."""
        previous, self.current = self.current, bundle
        log.info("hot reload: now serving model %s (was %s)", bundle.version, previous.version)
        if self._on_change:
            self._on_change(self)

    def refresh(self) -> bool:
        """Poll and install in one blocking call (for callers without an event loop); True when the version changed."""
        bundle = self.poll()
        if bundle is None:
            return False
        self.install(bundle)
        return True

    def available(self) -> list[str]:
        return list_versions(self._root)

    def loaded(self) -> list[ModelBundle]:
        return list(self._bundles.values())

    def roles(self) -> dict[str, str]:
        """Versions in use and why: current, split, shadow."""
        roles = {bundle.version: "split" for _, bundle in self._split}
        roles[self.current.version] = "current"
        if self.shadow is not None:
            roles.setdefault(self.shadow.version, "shadow")
        return roles

    def _build_split(self, weights: Mapping[str, float]) -> list[tuple[float, ModelBundle]]:
        if not weights:
            return []
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"traffic_split weights must be >= 0 and sum to > 0, got {dict(weights)}")
        total = sum(weights.values())
        split, upper = [], 0.0
        for version, weight in sorted(weights.items()):
            upper += weight / total
            split.append((upper, self.get(version)))
        return split

    def _load(self, version: str) -> ModelBundle:
        try:
            bundle = load_version(self._root, version)
            self._check(bundle)
        except (ModelLoadError, FeatureContractError) as error:
            raise ModelUnavailable(f"model_version {version}: {error}") from error
        self._attach_compiled(bundle)
        self._bundles[version] = bundle
        return bundle

    def _attach_compiled(self, bundle: ModelBundle) -> None:
        """Compiled predictors: required ('compiled'), or when cached now and otherwise in the background ('auto')."""
        if self._backend == "lightgbm":
            return
        if self._backend == "compiled" or bundle.has_compiled_cache():
            if not bundle.compile() and self._backend == "compiled":
                raise ModelUnavailable(f"model_version {bundle.version}: scoring_backend is 'compiled' but no verified compiled predictor could be built")
            return
        threading.Thread(target=bundle.compile, name=f"compile-{bundle.version}", daemon=True).start()
