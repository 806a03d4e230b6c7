"""CLI entry points of the offline-evaluation stages, light to import (heavy modules load only when a command runs).

propensity_cli/main.py wires them as `propensity evaluate` and `propensity score-batch`:
    p = sub.add_parser("evaluate", ...); paths(p); add_evaluate_arguments(p); p.set_defaults(func=cmd_evaluate)
"""

from __future__ import annotations

import argparse

from propensity.settings import settings_from_args


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `propensity evaluate` (--data/--work-dir/--feature-repo/--as-of come from the CLI's paths())."""
    parser.add_argument("--out", default="docs/evaluation", help="report directory (default docs/evaluation)")
    parser.add_argument("--label", required=True, help="dataset label, e.g. demo_h7 or uci_online_retail_h30 (one sub-directory each)")
    parser.add_argument("--horizon-days", type=int, help="override settings.training.horizon_days")
    parser.add_argument(
        "--n-cutoffs", type=int, help="all cut-offs to build (train + validation + test); default settings.training.n_cutoffs + test cut-offs - 1"
    )
    parser.add_argument(
        "--test-cutoffs", type=int, default=1, help="pool the last N cut-offs as the test period, for more test users (default 1)"
    )
    parser.add_argument("--trials", type=int, default=15, help="Optuna trials per model and objective; 0 turns tuning off")
    parser.add_argument("--tuning-seconds", type=float, default=60.0, help="wall-time cap of each search (a running trial finishes)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the CIs")


def add_score_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `propensity score-batch`."""
    parser.add_argument("--at", help="scoring timestamp (ISO-8601, UTC if no offset); default: the prepared data's as-of time")
    parser.add_argument("--out", required=True, help="output Parquet file (user_id, propensity, rank, item_id, item_score; with --users-only user_id, propensity)")
    parser.add_argument("--top-n", type=int, default=10, help="items per user")
    parser.add_argument(
        "--users-only", action="store_true", help="purchase propensity only, no items: streamed from the offline tables at bulk speed"
    )
    parser.add_argument(
        "--chunk-size", type=int, help="users per offline-store read and ranker call (default 5000; with --users-only 100000 per record batch)"
    )
    parser.add_argument("--version", help="model version (default: current)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluation import cmd_evaluate as run

    return run(args, settings_from_args(args))


def cmd_score_batch(args: argparse.Namespace) -> int:
    from training import lean_startup

    # Before training.batch_scoring imports LightGBM, and before anything imports Feast: start-up is part of a
    # batch command's throughput.
    lean_startup.import_lightgbm_without_sklearn()
    if args.users_only:  # the path that reads only the registry `feast apply` wrote
        lean_startup.skip_feast_type_checks()
    from training.batch_scoring import cmd_score_batch as run

    return run(args, settings_from_args(args))
