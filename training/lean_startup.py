"""Cheaper imports for `propensity score-batch`, a short batch command whose start-up is part of its throughput.

On the 20M-event bench shop score-batch --users-only scores 409,626 users in ~3 s of work, and the interpreter spent
as long again importing before that work began: the import of LightGBM (which pulls in scikit-learn and SciPy's
statistics) and of Feast (which instruments its classes with typeguard). Both are paid whatever the number of users.
Each function here is a no-op once the module concerned is imported, so an in-process caller (a test, a notebook)
keeps the ordinary modules.
"""

from __future__ import annotations

import importlib
import sys


def import_lightgbm_without_sklearn() -> None:
    """Import LightGBM without its scikit-learn integration (when this process has imported neither yet).

    lightgbm.compat imports scikit-learn, and through it SciPy's statistics, only to define the LGBMClassifier family
    (measured 0.6-1.3 s of `import lightgbm`'s 0.7-2.0 s here). score-batch uses LightGBM's Booster only. With
    scikit-learn hidden during the import LightGBM records it as not installed, exactly as on a machine without it; the
    entry is removed afterwards, so a later `import sklearn` in this process works as usual.
    """
    if "lightgbm" in sys.modules or "sklearn" in sys.modules:
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # None in sys.modules makes the import raise ImportError
    try:
        importlib.import_module("lightgbm")
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


def skip_feast_type_checks() -> None:
    """Import Feast without typeguard's run-time type checks (when this process has not imported it yet).

    Feast decorates its classes with typeguard's @typechecked, which re-parses and re-compiles each decorated
    class's source at import: about 70 % of `import feast` here (measured 2.2-2.4 s against 6.6-8.8 s on a loaded
    machine). score-batch only reads the registry that `feast apply` wrote (type-checked then), so the checks guard
    nothing here. typeguard itself skips instrumenting under `python -O`; this does the same for Feast's modules
    only, through the decorator Feast imports, and leaves any other typeguard user alone.
    """
    if "feast" in sys.modules:
        return
    try:
        import typeguard
    except ImportError:
        return
    checked = typeguard.typechecked

    def typechecked(target: object = None, **options: object) -> object:
        module = getattr(target, "__module__", None) or sys._getframe(1).f_globals.get("__name__", "")
        if module == "feast" or str(module).startswith("feast."):
            return target if target is not None else (lambda inner: inner)
        return checked(target, **options) if target is not None else checked(**options)

    typeguard.typechecked = typechecked
