"""`propensity`: one command with a subcommand per stage, and `run` for all of them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

from propensity.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    for name in ("data_dir", "work_dir", "feature_repo"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = Path(value).resolve()
    if getattr(args, "as_of", None):
        overrides["as_of"] = datetime.fromisoformat(args.as_of)
    settings = Settings(**overrides)
    if getattr(args, "port", None) is not None:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": args.port})})
    return settings


def _today() -> datetime:
    return datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from propensity.demo import DemoDataConfig, generate_demo_data

    settings = _settings(args)
    out = Path(args.out).resolve() if args.out else settings.data_dir
    demo = settings.demo
    config = DemoDataConfig(
        n_users=args.users or demo.n_users,
        n_items=args.items or demo.n_items,
        n_categories=min(demo.n_categories, args.items or demo.n_items),
        n_days=args.days or demo.n_days,
        seed=args.seed if args.seed is not None else demo.seed,
        end_time=_today(),
        file_format=args.format,
        # The oracle's horizon defaults to the evaluation's, so its cut-off is a test cut-off.
        oracle=getattr(args, "oracle", False),
        oracle_horizon_days=getattr(args, "oracle_horizon_days", None) or settings.training.horizon_days,
        oracle_replicates=getattr(args, "oracle_replicates", None) or DemoDataConfig.oracle_replicates,
    )
    summary = generate_demo_data(out, config)
    print(f"demo data: {summary.n_events:,} events, {summary.n_users:,} users, {summary.n_items:,} items in {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from propensity.importers import IMPORTERS

    source = Path(args.source) if args.source else None
    importer = IMPORTERS[args.dataset]
    # The importer prints its own summary (rows in, drops per reason, events out).
    importer(source, Path(args.out).resolve()) if source else importer(out_dir=Path(args.out).resolve())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from training.prepare import prepare

    from propensity.event_log import EventLog

    settings = _settings(args)
    ingested = EventLog(settings.event_log_dir).to_frame() if (settings.event_log_dir / "events.db").exists() else None
    prepare(settings.data_dir, settings.prepared_dir, as_of=settings.as_of, rebase_to=_today() if settings.rebase_to_now else None,
            extra_events=ingested, memory_limit_gb=settings.features.memory_limit_gb)
    return 0


def cmd_build_features(args: argparse.Namespace) -> int:
    from training.feature_build import build_features
    from training.prepare import load_prepared

    settings = _settings(args)
    prepared = load_prepared(settings.prepared_dir)
    summary = build_features(prepared.directory, settings.offline_dir, prepared.as_of, prepared.event_types, settings.features)
    print(f"feature tables written to {settings.offline_dir} in {summary.seconds:.1f}s")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Pipeline stage: feast apply, then load every view up to the run's as-of time."""
    from training.prepare import load_prepared
    from training.publish import publish_features

    settings = _settings(args)
    publish_features(settings.feature_repo, load_prepared(settings.prepared_dir).as_of, yaml_file=settings.feature_store_yaml)
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """feast apply + incremental materialization up to now, once or every N minutes."""
    from propensity.feature_store import feast_apply
    from training.publish import materialize_incremental

    settings = _settings(args)
    feast_apply(settings.feature_repo, settings.feature_store_yaml)
    while True:
        started = time.perf_counter()
        print(f"materialize-incremental at {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC", flush=True)
        report = materialize_incremental(settings.feature_repo, yaml_file=settings.feature_store_yaml)
        print(f"{sum(rows for rows, _ in report.values()):,} rows into the online store in {time.perf_counter() - started:.1f}s", flush=True)
        if not args.every:
            return 0
        time.sleep(max(0.0, args.every * 60 - (time.perf_counter() - started)))


def cmd_train(args: argparse.Namespace) -> int:
    from training.prepare import load_prepared
    from training.train import train

    settings = _settings(args)
    train(settings, load_prepared(settings.prepared_dir), promote_to_current=not args.no_promote, continue_from=getattr(args, "continue_from", None))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from server.log_setup import configure_logging

    configure_logging(settings.server.log_format)
    logging.getLogger("propensity.server").info("settings:\n%s", settings.describe())

    def announce(started: object) -> None:
        target = f"{settings.server.host}:{started.port}"
        print(
            f"\nserving propensity.v1.RecommendationService on {target} with {settings.server.workers} process(es) "
            f"(model {started.model_version}, {started.n_items:,} items, ready in {started.seconds:.1f}s). Try:\n"
            f"  .venv/bin/grpcurl -plaintext -d '{{\"user_id\": \"{args.example_user}\", \"num_items\": 5}}' {target} propensity.v1.RecommendationService/Recommend\n"
            f"  .venv/bin/propensity recommend {args.example_user} --target {target}\n"
            f"Ctrl-C stops the server.",
            flush=True,
        )

    if settings.server.workers > 1:
        from server.workers import run_workers

        return run_workers(settings, on_started=announce)
    from server.app import serve

    asyncio.run(serve(settings, on_started=announce))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """All stages in order: (demo data) -> prepare -> features -> Feast -> train -> (serve)."""
    started = time.perf_counter()
    settings = _settings(args)
    steps = []
    if args.demo:
        steps.append(("demo data", cmd_demo_data))
    steps += [("prepare", cmd_prepare), ("build features", cmd_build_features), ("feast apply + materialize", cmd_publish), ("train", cmd_train)]
    for number, (name, step) in enumerate(steps, start=1):
        print(f"\n== [{number}/{len(steps)}] {name}", flush=True)
        step(args)
    print(f"\npipeline finished in {time.perf_counter() - started:.1f}s (data {settings.data_dir}, models {settings.model_dir})", flush=True)
    if args.serve:
        args.example_user = args.example_user or _example_user(settings)
        return cmd_serve(args)
    return 0


def _example_user(settings: Settings) -> str:
    import pandas as pd

    events = pd.read_parquet(settings.prepared_dir / "events.parquet", columns=["user_id", "event_type"])
    buyers = events.loc[events["event_type"] == "purchase", "user_id"]
    return str((buyers if len(buyers) else events["user_id"]).value_counts().index[0])


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from propensity.client import PropensityClient

    with PropensityClient(args.target, timeout=args.timeout) as client:
        try:
            response = client.recommend(args.user_id, num_items=args.num_items, exclude_item_ids=args.exclude or ())
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    fallback = f" (fallback: {response.fallback_reason and _reason(response.fallback_reason)})" if response.fallback_used else ""
    print(f"user {response.user_id}: P(buy within horizon) = {response.purchase_propensity:.3f}{fallback}")
    print(f"model {response.model_version}, features {response.feature_service} + {response.item_feature_service}")
    for item in response.items:
        print(f"  {item.rank:>3}. {item.item_id:<16} {item.score:.4f}  {item.candidate_source}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import grpc

    from propensity.client import PropensityClient
    from propensity.replay import messages, read_events

    frame = read_events(Path(args.file))
    total = min(len(frame), args.limit or len(frame))
    print(f"replaying {total:,} events from {args.file} at {args.rate:g} events/s to {args.target}", flush=True)
    started = time.perf_counter()
    with PropensityClient(args.target) as client:
        try:
            response = client.ingest_events(messages(frame, args.rate, batch=args.batch, retime=not args.keep_times, limit=args.limit))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - started
    print(f"accepted {response.accepted:,}, duplicates {response.duplicates:,}, rejected {response.rejected:,} "
          f"in {seconds:.1f}s ({total / seconds:,.0f} events/s)")
    for rejection in response.rejections[:10]:
        print(f"  event {rejection.index} ({rejection.event_id or 'no id'}) {rejection.field}: {rejection.reason}")
    return 0


def _reason(value: int) -> str:
    from propensity.v1 import recommendation_service_pb2 as pb

    return pb.FallbackReason.Name(value)


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
        if name == "materialize":
            p.add_argument("--every", type=float, help="keep running: materialize every this many minutes")
        p.set_defaults(func=func)

    from training.commands import add_evaluate_arguments, add_score_batch_arguments, cmd_evaluate, cmd_score_batch

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
    p.add_argument("--limit", type=int, help="stop after this many events")
    p.add_argument("--keep-times", action="store_true", help="send the file's event times instead of the time of sending")
    p.add_argument("--target", default="localhost:50051")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("recommend", help="ask a running server for recommendations")
    p.add_argument("user_id")
    p.add_argument("--num-items", type=int, default=10)
    p.add_argument("--exclude", nargs="*", help="item ids to leave out")
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    p.set_defaults(func=cmd_recommend)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Feast and ibis emit deprecation chatter on every call; it is not actionable for users of this CLI.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
