"""The model versions a server answers with: current, A/B split, shadow, pins; hot reload on promotion.

The registry can change under a running server in any way (docs/reliability/processes.md): CURRENT
rewritten with garbage or removed, a version directory deleted, a half-written version promoted.
Whatever happens, the loaded bundles keep serving; each problem is logged once, when it appears,
and a refused version is tried again when it or CURRENT changes on disk (so re-promoting a
repaired version works, not only promoting a new id).

The A/B split and the shadow version come from the registry's routing.json when it sets them
(`propensity models split` / `shadow`), else from server settings: the registry wins, so every
replica agrees. It is re-read on every poll; a routing that names a version that cannot be loaded
is refused (logged once) and the previous routing keeps serving.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from propensity.feature_store import FeatureContractError
from propensity.model_registry import CURRENT, ModelBundle, ModelLoadError, current_version, list_versions, load_version
from propensity.registry_history import read_routing
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
        self._rejected_state: dict[str, tuple] = {}  # version -> what its files and CURRENT looked like then
        self._registry_problem = ""  # the last registry-level problem logged (each is logged once)
        self.current = self._load(current_version(root))
        self._settings_routing = (dict(traffic_split or {}), shadow_version)
        self._routing_problem = ""
        self._refused_routing: tuple | None = None
        self._routing = self._settings_routing
        self._split = self._build_split(self._routing[0])
        self.shadow = self._load(self._routing[1]) if self._routing[1] else None
        self._follow_routing()  # the registry's routing wins; one it cannot serve is logged and the settings' kept

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
        split = self._split  # read once: a routing change replaces the list, never edits it
        if pinned or not split:
            return self.get(pinned)
        point = bucket(user_id)
        for upper, bundle in split:
            if point < upper:
                return bundle
        return split[-1][1]

    def _wanted_routing(self) -> tuple[dict[str, float], str]:
        """(split, shadow): the registry's routing.json where it sets them, else the server settings."""
        split, shadow = self._settings_routing
        try:
            routing = read_routing(self._root)
        except ModelLoadError as error:
            if str(error) != self._routing_problem:
                log.error("model routing unreadable, keeping the split and shadow in use: %s", error)
            self._routing_problem = str(error)
            return self._routing
        self._routing_problem = ""
        return (routing.traffic_split if routing.traffic_split is not None else split,
                routing.shadow_version if routing.shadow_version is not None else shadow)

    def _follow_routing(self) -> None:
        """Apply a changed split or shadow from the registry (blocking: loads the versions it names)."""
        wanted = self._wanted_routing()
        if wanted == self._routing or wanted == self._refused_routing:
            return
        try:
            split = self._build_split(wanted[0])
            shadow = self.get(wanted[1]) if wanted[1] else None
        except (ModelUnavailable, UnknownModelVersion, ValueError) as error:
            self._refused_routing = wanted
            log.error("refusing model routing split=%s shadow=%r, keeping the one in use: %s", wanted[0], wanted[1], error)
            return
        self._split, self.shadow, self._routing = split, shadow, wanted
        log.info("model routing: split %s, shadow %r", {v: w for v, w in wanted[0].items()} or "none", wanted[1] or "none")
        if self._on_change:
            self._on_change(self)

    def poll(self) -> ModelBundle | None:
        """A newly promoted version, loaded and validated, or None; blocking (file reads, model parsing): call it off the loop.

        Does not change what is served: hand the result to `install`. A version that fails to load or
        validate is refused and logged, and None is returned; it is tried again only once its files or
        CURRENT change on disk (a repaired version promoted again). A changed split or shadow in the
        registry is applied here (it does not change the current version).
        """
        self._follow_routing()
        try:
            promoted = current_version(self._root)
        except ModelLoadError as error:
            self._registry_trouble(f"model registry unreadable, keeping model {self.current.version}: {error}")
            return None
        if promoted == self.current.version:
            directory = self._root / "versions" / promoted
            self._registry_trouble(
                "" if directory.is_dir() else f"the served model version's directory {directory} is gone; still serving {promoted} from memory"
            )
            return None
        self._registry_trouble("")
        state = self._disk_state(promoted)
        if self._rejected_state.get(promoted) == state:
            return None
        try:
            return self._load(promoted)
        except ModelUnavailable as error:
            self.rejected[promoted] = str(error)
            self._rejected_state[promoted] = state
            log.error("refusing promoted model %s, still serving %s: %s", promoted, self.current.version, error)
            return None

    def _registry_trouble(self, problem: str) -> None:
        """Log a registry-level problem when it first appears (not on every poll), and when it is over."""
        if problem and problem != self._registry_problem:
            log.error("%s", problem)
        elif not problem and self._registry_problem:
            log.info("model registry readable again; serving %s", self.current.version)
        self._registry_problem = problem

    def _disk_state(self, version: str) -> tuple:
        """What CURRENT and a version's files look like on disk: a refused version is retried when this changes."""
        entries = []
        for path in (self._root / CURRENT, *sorted((self._root / "versions" / version).glob("*"))):
            try:
                stat = path.stat()
                entries.append((path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                entries.append((path.name, None))
        return tuple(entries)

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
        except Exception as error:  # anything else in a registry that changed under us is a refusal too, never a crash
            raise ModelUnavailable(f"model_version {version}: {type(error).__name__}: {error}") from error
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
        threading.Thread(target=_compile_quietly, args=(bundle,), name=f"compile-{bundle.version}", daemon=True).start()


def _compile_quietly(bundle: ModelBundle) -> None:
    """Compile in the background; on failure (e.g. the version directory was deleted meanwhile) keep LightGBM and log why."""
    try:
        bundle.compile()
    except Exception as error:
        log.warning("model %s: compiling failed, scoring with LightGBM: %s: %s", bundle.version, type(error).__name__, error)
