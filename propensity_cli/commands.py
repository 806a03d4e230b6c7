"""The handler of each `propensity` subcommand: settings from the command line, then one call into training/, server/ or the client.

Heavy modules (pandas, LightGBM, Feast, gRPC) are imported inside the handlers, so `propensity --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from propensity.settings import Settings, settings_from_args


def _today() -> datetime:
    return datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from propensity.demo import DemoDataConfig, generate_demo_data

    settings = settings_from_args(args)
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

    from propensity.erasure import WriteFence, tombstones
    from propensity.event_log_postgres import read_event_log

    settings = settings_from_args(args)
    fence = WriteFence.begin(settings)  # a shopper forgotten while this runs is scrubbed from what it wrote (docs/privacy.md)
    ingested = read_event_log(settings)  # the shared PostgreSQL log or this machine's SQLite one (ingest.event_log)
    prepare(settings.data_dir, settings.prepared_dir, as_of=settings.as_of, rebase_to=_today() if settings.rebase_to_now else None,
            extra_events=ingested, memory_limit_gb=settings.features.memory_limit_gb, forgotten=tombstones(settings))
    fence.settle_files(sorted(settings.prepared_dir.rglob("*.parquet")))
    return 0


def cmd_build_features(args: argparse.Namespace) -> int:
    from propensity.erasure import WriteFence
    from training.feature_build import build_features
    from training.prepare import load_prepared

    settings = settings_from_args(args)
    fence = WriteFence.begin(settings)  # a shopper forgotten while this runs is scrubbed from what it wrote (docs/privacy.md)
    prepared = load_prepared(settings.prepared_dir)
    summary = build_features(prepared.directory, settings.offline_dir, prepared.as_of, prepared.event_types, settings.features)
    fence.settle_files(summary.files.values())
    print(f"feature tables written to {settings.offline_dir} in {summary.seconds:.1f}s")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Pipeline stage: feast apply, then load every view up to the run's as-of time."""
    from propensity.erasure import WriteFence
    from training.prepare import load_prepared
    from training.publish import publish_features

    settings = settings_from_args(args)
    fence = WriteFence.begin(settings)  # a shopper forgotten while this runs is deleted again from the online store
    publish_features(settings.feature_repo, load_prepared(settings.prepared_dir).as_of, yaml_file=settings.feature_store_yaml)
    fence.settle_online()
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """feast apply + incremental materialization up to now, once or every N minutes."""
    from propensity.erasure import WriteFence
    from propensity.feature_store import feast_apply
    from training.publish import materialize_incremental

    settings = settings_from_args(args)
    feast_apply(settings.feature_repo, settings.feature_store_yaml)
    while True:
        started = time.perf_counter()
        print(f"materialize-incremental at {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC", flush=True)
        fence = WriteFence.begin(settings)  # a shopper forgotten while this runs is deleted again from the online store
        report = materialize_incremental(settings.feature_repo, yaml_file=settings.feature_store_yaml)
        fence.settle_online()
        print(f"{sum(rows for rows, _ in report.values()):,} rows into the online store in {time.perf_counter() - started:.1f}s", flush=True)
        if not args.every:
            return 0
        time.sleep(max(0.0, args.every * 60 - (time.perf_counter() - started)))


def cmd_train(args: argparse.Namespace) -> int:
    from training.prepare import load_prepared
    from training.train import train

    settings = settings_from_args(args)
    train(settings, load_prepared(settings.prepared_dir), promote_to_current=not args.no_promote, continue_from=getattr(args, "continue_from", None),
          force=getattr(args, "force", False), by=getattr(args, "by", None), reason=getattr(args, "reason", "") or "")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from server.log_setup import configure_logging

    configure_logging(settings.server.log_format)
    logging.getLogger("propensity.server").info("settings:\n%s", settings.describe())

    from server.tls import InsecureTransportError, check_transport

    try:
        check_transport(settings)
    except InsecureTransportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    security = settings.security
    grpcurl_tls, cli_tls = "-plaintext", ""
    if security.tls_cert_file:  # how to call it: the server's own CA file is a guess; docs/security.md has the details
        grpcurl_tls, cli_tls = "-cacert CA.pem", " --ca-cert CA.pem"
        if security.client_ca_file:
            grpcurl_tls, cli_tls = grpcurl_tls + " -cert CLIENT.pem -key CLIENT.key", cli_tls + " --cert CLIENT.pem --key CLIENT.key"

    def announce(started: object) -> None:
        target = f"{settings.server.host}:{started.port}"
        print(
            f"\nserving propensity.v1.RecommendationService on {target} with {settings.server.workers} process(es) "
            f"(model {started.model_version}, {started.n_items:,} items, ready in {started.seconds:.1f}s). Try:\n"
            f"  .venv/bin/grpcurl {grpcurl_tls} -d '{{\"user_id\": \"{args.example_user}\", \"num_items\": 5}}' {target} propensity.v1.RecommendationService/Recommend\n"
            f"  .venv/bin/propensity recommend {args.example_user} --target {target}{cli_tls}\n"
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
    settings = settings_from_args(args)
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

    with _client(args, timeout=args.timeout) as client:
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

    from propensity.replay import messages, read_events, replay

    frame = read_events(Path(args.file))
    total = min(len(frame), args.limit or len(frame))
    print(f"replaying {total:,} events from {args.file} at {args.rate:g} events/s to {args.target} "
          f"({args.streams} streams of up to {args.messages_per_stream} messages of {args.batch} events)", flush=True)
    source = messages(frame, args.rate, batch=args.batch, retime=not args.keep_times, limit=args.limit)
    with _client(args) as client:
        try:
            done = replay(source, total, lambda stream: client.ingest_events(stream), streams=args.streams,
                          messages_per_stream=args.messages_per_stream,
                          on_progress=lambda progress, rate: print(f"  {progress.line(rate)}", flush=True))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"accepted {done.accepted:,}, duplicates {done.duplicates:,}, rejected {done.rejected:,} "
          f"in {done.seconds:.1f}s ({done.acknowledged / max(done.seconds, 1e-9):,.0f} events/s)"
          + (f"; {done.pushes_pending:,} feature updates wait for the online store" if done.pushes_pending else ""))
    for rejection in done.rejections[:10]:
        print(f"  event {rejection.index} ({rejection.event_id or 'no id'}) {rejection.field}: {rejection.reason}")
    return 0


def _client(args: argparse.Namespace, **options: object) -> object:
    """A PropensityClient with the command line's TLS options and token (--token-file, else $PROPENSITY_TOKEN)."""
    import os

    from propensity.client import PropensityClient, tls_credentials

    credentials = None
    if args.tls or args.ca_cert or args.cert:
        credentials = tls_credentials(args.ca_cert, args.cert, args.key)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("PROPENSITY_TOKEN", "").strip()
    return PropensityClient(args.target, credentials=credentials, token=token or None, **options)


def _reason(value: int) -> str:
    from propensity.v1 import recommendation_service_pb2 as pb

    return pb.FallbackReason.Name(value)


# -- propensity models ... (docs/models.md) ------------------------------------------------------


def _refusal(error: Exception) -> int:
    """A missing version, nothing to roll back to, bad weights: one line on stderr, exit 1, no traceback."""
    print(f"propensity models: {error}", file=sys.stderr)
    return 1


def _models_root(args: argparse.Namespace) -> Path:
    return settings_from_args(args).model_dir


def _roles(root: Path, settings: Settings | None = None) -> dict[str, list[str]]:
    """version -> its roles: current, split (with weight), shadow; the registry's routing wins over settings."""
    from propensity.model_registry import ModelLoadError, current_version
    from propensity.registry_history import Routing, read_routing

    try:
        routing = read_routing(root)
    except ModelLoadError as error:  # roles are shown from CURRENT and settings; the damage is reported, not fatal
        print(f"warning: {error}", file=sys.stderr)
        routing = Routing()
    split = routing.traffic_split if routing.traffic_split is not None else (settings.server.traffic_split if settings else {})
    shadow = routing.shadow_version if routing.shadow_version is not None else (settings.server.shadow_version if settings else "")
    roles: dict[str, list[str]] = {}
    try:
        roles.setdefault(current_version(root), []).append("current")
    except ModelLoadError:
        pass
    total = sum(split.values()) or 1.0
    for version, weight in sorted(split.items()):
        roles.setdefault(version, []).append(f"split {weight / total:.0%}")
    if shadow:
        roles.setdefault(shadow, []).append("shadow")
    return roles


def _metric(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def cmd_models_list(args: argparse.Namespace) -> int:
    import json

    from propensity.model_registry import METADATA, list_versions

    settings = settings_from_args(args)
    root = settings.model_dir
    roles = _roles(root, settings)
    rows = []
    for version in list_versions(root):
        try:
            meta = json.loads((root / "versions" / version / METADATA).read_text())
        except (OSError, ValueError) as error:
            rows.append({"version": version, "error": str(error), "roles": roles.get(version, [])})
            continue
        user = meta.get("models", {}).get("user_propensity", {}).get("metrics", {})
        ranker = meta.get("models", {}).get("item_ranker", {}).get("metrics", {})
        services = meta.get("feature_services", {})
        rows.append({
            "version": version,
            "created": meta.get("trained_at"),
            "feature_services": [services.get(r, {}).get("name") for r in ("user", "item")],
            "train_window": meta.get("train_window"),
            "validation_window": meta.get("validation_window"),
            "test_window": meta.get("test_window"),
            "validation": {"user_auc": user.get("auc"), "user_logloss": user.get("logloss"), "ranker_ndcg_at_10": ranker.get("ndcg_at_10"),
                           "ranker_recall_at_10": ranker.get("recall_at_10")},
            "test": {"user_auc": user.get("test_auc"), "user_logloss": user.get("test_logloss"), "ranker_auc": ranker.get("test_auc")},
            "roles": roles.get(version, []),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no model versions in {root}")
        return 0
    print(f"{'VERSION':<20} {'CREATED':<20} {'FEATURE SERVICES':<38} {'TRAIN WINDOW':<23} "
          f"{'VAL AUC':>7} {'VAL LL':>7} {'NDCG@10':>7} {'TEST AUC':>8} {'TEST LL':>7}  ROLE")
    for row in rows:
        if "error" in row:
            print(f"{row['version']:<20} unreadable metadata: {row['error']}  {', '.join(row['roles'])}")
            continue
        window = row["train_window"] or {}
        span = f"{(window.get('start') or '')[:10]}..{(window.get('end') or '')[:10]}"
        v, t = row["validation"], row["test"]
        print(f"{row['version']:<20} {(row['created'] or '')[:19]:<20} {' + '.join(map(str, row['feature_services'])):<38} {span:<23} "
              f"{_metric(v, 'user_auc'):>7} {_metric(v, 'user_logloss'):>7} {_metric(v, 'ranker_ndcg_at_10'):>7} "
              f"{_metric(t, 'user_auc'):>8} {_metric(t, 'user_logloss'):>7}  {', '.join(row['roles'])}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    import json

    from propensity.model_registry import METADATA, check_version_id

    settings = settings_from_args(args)
    root = settings.model_dir
    check_version_id(args.version)
    directory = root / "versions" / args.version
    if not (directory / METADATA).exists():
        print(f"error: no model version {args.version} in {root}", file=sys.stderr)
        return 1
    meta = json.loads((directory / METADATA).read_text())
    roles = _roles(root, settings).get(args.version, [])
    print(f"model version {args.version} ({', '.join(roles) or 'not serving'}) in {directory}")
    print(json.dumps(meta, indent=2))
    report = directory / "report.md"
    if report.exists() and not args.no_report:
        print(f"\n--- {report}\n{report.read_text()}")
    return 0


def _print_entry(entry: dict) -> None:
    forced = " (FORCED past the gate)" if entry.get("forced") else ""
    print(f"{entry['action']}: {entry.get('version', entry.get('traffic_split', entry.get('shadow_version')))}"
          f"{' (was ' + str(entry['previous']) + ')' if entry.get('previous') else ''}{forced} by {entry['by']} at {entry['time']}: {entry['reason']}")


def cmd_models_promote(args: argparse.Namespace) -> int:
    from propensity.registry_history import promote_version

    from propensity.model_registry import ModelLoadError

    try:
        _print_entry(promote_version(_models_root(args), args.version, by=args.by, reason=args.reason))
    except ModelLoadError as error:
        return _refusal(error)
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from propensity.registry_history import rollback

    from propensity.model_registry import ModelLoadError

    try:
        _print_entry(rollback(_models_root(args), by=args.by, reason=args.reason))
    except ModelLoadError as error:
        return _refusal(error)
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    import json

    from propensity.registry_history import read_history

    for entry in read_history(_models_root(args)):
        if args.json:
            print(json.dumps(entry, sort_keys=True))
        else:
            _print_entry(entry)
    return 0


def cmd_models_split(args: argparse.Namespace) -> int:
    from propensity.registry_history import set_split

    weights = {}
    for item in args.weights:
        version, _, weight = item.partition("=")
        if not weight:
            print(f"error: expected VERSION=WEIGHT, got {item!r}", file=sys.stderr)
            return 2
        weights[version] = float(weight)
    from propensity.model_registry import ModelLoadError

    try:
        _print_entry(set_split(_models_root(args), {} if args.clear else weights, by=args.by, reason=args.reason))
    except (ModelLoadError, ValueError) as error:
        return _refusal(error)
    return 0


def cmd_models_shadow(args: argparse.Namespace) -> int:
    from propensity.registry_history import set_shadow

    from propensity.model_registry import ModelLoadError

    try:
        _print_entry(set_shadow(_models_root(args), "" if args.off else args.version, by=args.by, reason=args.reason))
    except (ModelLoadError, ValueError) as error:
        return _refusal(error)
    return 0


def cmd_models_compare(args: argparse.Namespace) -> int:
    """Build the latest held-out period as training does, score both versions on it, print the differences with CIs."""
    import json

    from propensity.model_registry import ModelLoadError, load_version
    from training.evaluation.comparison import metric_label, signed
    from training.lifecycle import compare_versions, leakage, score_held_out
    from training.prepare import load_prepared
    from training.training_data import build_training_data

    settings = settings_from_args(args)
    try:
        bundles = {v: load_version(settings.model_dir, v) for v in (args.a, args.b)}
    except ModelLoadError as error:
        return _refusal(error)
    if args.a == args.b:
        return _refusal(ValueError("compare needs two different versions"))
    built = build_training_data(settings, load_prepared(settings.prepared_dir), progress=lambda line: print(line, file=sys.stderr))
    scores = score_held_out(built, bundles)
    comparisons = compare_versions(scores, args.a, args.b, n_boot=args.bootstrap, seed=settings.training.seed)
    notes = {v: leakage(b.metadata, scores.period) for v, b in bundles.items()}
    if args.json:
        print(json.dumps({"period": scores.period, "summary": {v: scores.summary(v) for v in bundles},
                          "differences": [c.to_json() for c in comparisons], "leakage": notes}, indent=2, default=float))
        return 0
    print(f"held-out period {', '.join(p[:10] for p in scores.period)}: {len(scores.y):,} users ({int(scores.y.sum())} bought), "
          f"{len(scores.ranking[args.a]):,} buyers ranked; differences are {args.a} - {args.b} with paired bootstrap 95 % CIs")
    print(f"{'TASK':<11} {'METRIC':<11} {args.a:>18} {args.b:>18} {'DIFFERENCE':>11} {'95% CI':>20}  VERDICT")
    for c in comparisons:
        print(f"{c.task:<11} {metric_label(c.metric):<11} {c.model_value:>18.4f} {c.baseline_value:>18.4f} {signed(c.difference):>11} "
              f"{'[' + signed(c.ci_low) + ', ' + signed(c.ci_high) + ']':>20}  {c.verdict}{' (' + c.reason + ')' if c.reason else ''}")
    for version, note in notes.items():
        if note:
            print(f"note: {version} has seen these labels: {note}")
    return 0
