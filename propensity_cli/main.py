"""`propensity`: one command with a subcommand per stage, and `run` for all of them."""

from __future__ import annotations

import argparse
import sys
import warnings

from propensity_cli.commands import (
    cmd_build_features,
    cmd_demo_data,
    cmd_import,
    cmd_materialize,
    cmd_models_compare,
    cmd_models_history,
    cmd_models_list,
    cmd_models_promote,
    cmd_models_rollback,
    cmd_models_shadow,
    cmd_models_show,
    cmd_models_split,
    cmd_prepare,
    cmd_publish,
    cmd_recommend,
    cmd_replay,
    cmd_run,
    cmd_serve,
    cmd_train,
)
from propensity_cli.forget import add_forget_command
from training.commands import add_evaluate_arguments, add_score_batch_arguments, cmd_evaluate, cmd_score_batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="propensity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", dest="data_dir", help="raw event directory (events, items, users files)")
        p.add_argument("--work-dir", help="where prepared data and models go (default ./var)")
        p.add_argument("--feature-repo", help="Feast repository (default ./feature_repo)")
        p.add_argument("--as-of", help="as-of time (ISO-8601, a UTC midnight); default: the day after the last event")

    def demo_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--users", type=int, help="demo shoppers")
        p.add_argument("--items", type=int, help="demo items")
        p.add_argument("--days", type=int, help="demo days of history")
        p.add_argument("--seed", type=int, help="demo random seed")
        p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
        p.add_argument("--oracle", action="store_true",
                       help="also write <out>/oracle/: each user's (and user-item's) true P(buy) in the last horizon days")
        p.add_argument("--oracle-horizon-days", type=int, help="the oracle's window (default: the training horizon, 7)")
        p.add_argument("--oracle-replicates", type=int, help="Monte Carlo continuations behind each probability (default 200)")

    p = sub.add_parser("demo-data", help="generate a synthetic shop's event log")
    paths(p)
    demo_options(p)
    p.add_argument("--out", help="output directory (default: settings.data_dir)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("import", help="convert a real dataset from ../shared/data into the raw schema")
    p.add_argument("dataset", choices=("uci-online-retail", "rees46", "diginetica"))
    p.add_argument("--source", help="source file (default: the copy in ../shared/data)")
    p.add_argument("--out", required=True, help="output directory for events/items/users files")
    p.set_defaults(func=cmd_import)

    for name, func, text in (
        ("prepare", cmd_prepare, "validate the raw log and rebase its clock"),
        ("build-features", cmd_build_features, "raw events -> offline feature tables"),
        ("publish", cmd_publish, "feast apply + materialize every view up to the run's as-of time"),
        ("materialize", cmd_materialize, "feast apply + incremental materialization up to now, with rows and freshness per view"),
        ("train", cmd_train, "train both models from point-in-time features"),
    ):
        p = sub.add_parser(name, help=text)
        paths(p)
        if name == "train":
            p.add_argument("--no-promote", action="store_true", help="save the version without making it current")
            p.add_argument("--continue-from", help="the version this one replaces; refused if its feature services changed since")
            p.add_argument("--force", action="store_true",
                           help="promote even if the promotion gate refuses the new version (recorded in the registry's history)")
            p.add_argument("--reason", default="", help="why (recorded with the promotion)")
            p.add_argument("--by", help="who (recorded with the promotion; default: $USER)")
        if name == "materialize":
            p.add_argument("--every", type=float, help="keep running: materialize every this many minutes")
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="fit as train does, score the held-out test period against baselines, write the report")
    paths(p)
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score-batch", help="score every active user (and top-N items) from the offline store at a timestamp")
    paths(p)
    add_score_batch_arguments(p)
    p.set_defaults(func=cmd_score_batch)

    p = sub.add_parser("serve", help="start the gRPC server")
    paths(p)
    p.add_argument("--port", type=int)
    p.add_argument("--example-user", default="u000001", help="user id printed in the how-to-call lines")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="every stage in order, optionally then serve")
    paths(p)
    demo_options(p)
    p.add_argument("--demo", action="store_true", help="generate demo data into --data first")
    p.add_argument("--serve", action="store_true", help="serve when the pipeline is done")
    p.add_argument("--port", type=int)
    p.add_argument("--no-promote", action="store_true")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--example-user", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="stream an events file into a running server (IngestEvents)")
    p.add_argument("file", help="events file in the raw schema (CSV or Parquet)")
    p.add_argument("--rate", type=float, default=100.0, help="events per second (0: as fast as possible)")
    p.add_argument("--batch", type=int, default=50, help="events per stream message")
    p.add_argument("--streams", type=int, default=4, help="client streams open at once (the server overlaps their messages)")
    p.add_argument("--messages-per-stream", type=int, default=20, help="messages per stream before it is closed and answered")
    p.add_argument("--limit", type=int, help="stop after this many events")
    p.add_argument("--keep-times", action="store_true", help="send the file's event times instead of the time of sending")
    p.add_argument("--target", default="localhost:50051")
    credential_options(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("recommend", help="ask a running server for recommendations")
    p.add_argument("user_id")
    p.add_argument("--num-items", type=int, default=10)
    p.add_argument("--exclude", nargs="*", help="item ids to leave out")
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    credential_options(p)
    p.set_defaults(func=cmd_recommend)

    add_models_commands(sub, paths)
    add_forget_command(sub, paths)
    return parser


def add_models_commands(sub: argparse._SubParsersAction, paths: object) -> None:
    """`propensity models ...`: list, show, compare, promote, rollback, history, split, shadow (docs/models.md)."""
    models = sub.add_parser("models", help="list, compare, promote and roll back model versions; set the A/B split and shadow")
    verbs = models.add_subparsers(dest="models_command", required=True)

    def change(p: argparse.ArgumentParser) -> None:
        paths(p)
        p.add_argument("--reason", required=True, help="why (recorded in the registry's history)")
        p.add_argument("--by", help="who (default: $USER)")

    p = verbs.add_parser("list", help="every version: creation time, feature services, windows, metrics, role")
    paths(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models_list)

    p = verbs.add_parser("show", help="one version's metadata and training report")
    paths(p)
    p.add_argument("version")
    p.add_argument("--no-report", action="store_true", help="metadata only")
    p.set_defaults(func=cmd_models_show)

    p = verbs.add_parser("compare", help="score A and B on the same latest held-out period; differences with paired bootstrap CIs")
    paths(p)
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models_compare)

    p = verbs.add_parser("promote", help="make VERSION current (atomic; recorded with who and why)")
    change(p)
    p.add_argument("version")
    p.set_defaults(func=cmd_models_promote)

    p = verbs.add_parser("rollback", help="make the previously current version current again")
    change(p)
    p.set_defaults(func=cmd_models_rollback)

    p = verbs.add_parser("history", help="every promotion, rollback, split and shadow change, oldest first")
    paths(p)
    p.add_argument("--json", action="store_true", help="the raw JSON lines")
    p.set_defaults(func=cmd_models_history)

    p = verbs.add_parser("split", help="set the A/B split in the registry: VERSION=WEIGHT ... (every replica follows)")
    change(p)
    p.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT")
    p.add_argument("--clear", action="store_true", help="no split: all unpinned traffic to the current version")
    p.set_defaults(func=cmd_models_split)

    p = verbs.add_parser("shadow", help="set the shadow version in the registry (scored alongside, never returned)")
    change(p)
    p.add_argument("version", nargs="?", default="")
    p.add_argument("--off", action="store_true", help="no shadow version")
    p.set_defaults(func=cmd_models_shadow)


def credential_options(p: argparse.ArgumentParser) -> None:
    """TLS and token options of the commands that call a server (docs/security.md)."""
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs (implied by --ca-cert)")
    p.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate")
    p.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--token-file", help="file holding a bearer token (default: the PROPENSITY_TOKEN environment variable); "
                   "never on the command line, where other users' `ps` would see it")


def main(argv: list[str] | None = None) -> int:
    # Feast and ibis emit deprecation chatter on every call; it is not actionable for users of this CLI.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        from propensity.raw_data.errors import RawDataError  # here: the raw-data package imports pandas (~0.3 s of start-up)

        if not isinstance(error, RawDataError):
            raise
        # Bad input files are the operator's to fix: the message names file, line/row and column; a
        # traceback would only bury it.
        print(f"propensity {args.command}: {error}", file=sys.stderr)
        return 2
