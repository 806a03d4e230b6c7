"""Promotion of a freshly trained version past the gate (training/lifecycle.py), or forced past it, with the reasons."""

from __future__ import annotations

from collections.abc import Callable

from propensity.model_registry import ModelLoadError, load_version
from propensity.registry_history import promote_version
from propensity.settings import Settings
from training.training_data import TrainingData


def promote_past_gate(
    settings: Settings, built: TrainingData, version: str, force: bool, by: str | None, reason: str, progress: Callable[[str], None] = print
) -> tuple[bool, dict]:
    """Promote `version` if it is at least as good as the current one on the held-out period (or if forced); say why either way."""
    from training.lifecycle import promotion_gate  # imports the evaluation code, which imports this module

    root = settings.model_dir
    try:
        current = load_version(root)
    except ModelLoadError as error:  # none yet, or one that no longer loads: nothing to hold the new version to
        current = None
        progress(f"  promotion gate: no loadable current version ({error})")
    decision = promotion_gate(built, load_version(root, version), current, settings.training)
    gate = decision.to_json()
    forced = force and not decision.passed
    if decision.passed or force:
        default = "trained; passed the promotion gate" if decision.passed else "trained; promoted with --force past the gate"
        promote_version(root, version, by=by, reason=reason or default, forced=forced, gate=gate)
        progress(f"  promoted {version}{' (FORCED: the gate refused it)' if forced else ''}: " + "; ".join(decision.reasons))
        return True, gate
    progress(f"  NOT promoted: {version} is registered, {decision.current} stays current: " + "; ".join(decision.reasons)
             + f". Promote it anyway with `propensity models promote {version} --reason ...` or train with --force.")
    return False, gate
