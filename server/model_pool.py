"""The model versions a server can answer with: current by default, others loaded on first pin."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from propensity.feature_store import FeatureContractError
from propensity.model_registry import ModelBundle, ModelLoadError, current_version, list_versions, load_version
from server.errors import ModelUnavailable, UnknownModelVersion


class ModelPool:
    """Loads and validates model versions from the registry root; every loaded bundle passed its contract check."""

    def __init__(self, root: Path, check_contract: Callable[[ModelBundle], None]) -> None:
        self._root = root
        self._check = check_contract
        self._lock = threading.Lock()
        self._bundles: dict[str, ModelBundle] = {}
        self.current = self._load(current_version(root))

    def get(self, version: str = "") -> ModelBundle:
        if not version or version == self.current.version:
            return self.current
        bundle = self._bundles.get(version)
        if bundle is not None:
            return bundle
        if version not in list_versions(self._root):
            raise UnknownModelVersion(f"model_version: no model version {version!r}; available: {', '.join(self.available())}")
        with self._lock:
            return self._bundles.get(version) or self._load(version)

    def available(self) -> list[str]:
        return list_versions(self._root)

    def loaded(self) -> list[ModelBundle]:
        return list(self._bundles.values())

    def _load(self, version: str) -> ModelBundle:
        try:
            bundle = load_version(self._root, version)
            self._check(bundle)
        except (ModelLoadError, FeatureContractError) as error:
            raise ModelUnavailable(f"model_version {version}: {error}") from error
        self._bundles[version] = bundle
        return bundle
