"""docs/benchmarks/README.md and latency_throughput.png from results.json."""

from __future__ import annotations

from pathlib import Path

COMMAND = "make bench   # = .venv/bin/python -m bench.run"


def table(results: dict) -> str:
    """Markdown table: one row per server and concurrency."""
    lines = ["| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | failures | users | server CPU ms/req | cores busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("ours", "naive"):
        for level in results["recommend"][name]:
            cpu = level.get("server_cpu_ms_per_request")
            lines.append(
                f"| {name} | {level['concurrency']} | {level['throughput_rps']:,.1f} | {level['p50']:.2f} | {level['p95']:.2f} "
                f"| {level['p99']:.2f} | {level['failures']} | {level.get('users', '')} | {'' if cpu is None else f'{cpu:.3f}'} "
                f"| {level.get('server_cores_busy', '')} |"
            )
    return "\n".join(lines)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:,.2f}x"
    if unit in ("req/s", "users/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:.3f} {unit}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def verdict(row: dict) -> str:
    """met / short for targets, 'reported' for figures without a goal; says when the generator, not the server, limits a tail."""
    if row["met"] is None:
        return "reported"
    text = "**met**" if row["met"] else "**short**"
    if row.get("generator_limited") and not row["met"]:
        late = row.get("lateness_p99_ms")
        text += (" (generator-limited: the generator, not the server, is the limit here; its own sends were "
                 + (f"{late:.1f} ms late at p99)" if late is not None else "late)"))
    if row.get("rate_kept") is False:
        text += " (the offered rate was not achieved: an overloaded server's tail, not judged)"
    if row.get("exported") is False:
        text = "**short** (not exported)"
    return text


def _measured(row: dict) -> str:
    name, value, unit = row["name"], row["value"], row["unit"]
    if name == "event_loop_lag_max_ms":
        if row.get("exported") is False:
            return "not exported"
        during = row.get("samples_during_load")
        if during is None:
            return f"max {_fmt(value, unit)} since start"
        over, bound = row.get("samples_over_limit_during_load"), row.get("max_bucket_bound_ms_during_load")
        text = (f"{'?' if over is None else f'{over:,}'} of {during:,} lag samples over 5 ms during the load"
                + (f" (all <= {bound:g} ms)" if bound is not None else "") + f"; max since start {_fmt(value, unit)}")
        periodic = row.get("periodic")
        if periodic:
            text += (f". While periodic work ran: {periodic['samples_over_limit_during_periodic']:,} of {periodic['samples_during_periodic']:,} "
                     f"samples over 5 ms ({_percent(periodic.get('share_over_limit_during_periodic'))}), otherwise "
                     f"{periodic['samples_over_limit_outside_periodic']:,} of {periodic['samples_outside_periodic']:,} "
                     f"({_percent(periodic.get('share_over_limit_outside_periodic'))}; one-sided Fisher p = {periodic['excess_p_value']:.3g}); "
                     f"periodic steps on the loop over 5 ms: {periodic['steps_over_limit']}")
        return text
    if value is None and name.startswith("user_read"):
        return "not measured"
    text = _fmt(value, unit)
    if name == "throughput_ratio_vs_previous" and row.get("previous_rps"):
        text += f" (previous max {row['previous_rps']:,.1f} req/s)"
    elif name == "throughput_ratio_vs_previous":
        text = "n/a (no previous results.json)"
    elif name == "cpu_ms_per_request" and row.get("naive") is not None:
        text += f" (naive {row['naive']:.2f} ms)"
    elif name == "open_loop_p99_over_p50" and row.get("p50_ms") is not None:
        text += f" (p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms)"
    elif name == "server_time_vs_compute_floor":
        text += f" (floor {row['floor_ms']:.3f} ms, limit {row['limit_ms']:.3f} ms)"
    return text


def targets_table(results: dict) -> str:
    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    for row in results["targets"]:
        lines.append(f"| {row['label']} | {_measured(row)} | {row['goal']} | {verdict(row)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"ours": ("tab:blue", "propensity serve"), "naive": ("tab:red", "naive sync server")}
    for ax, name in zip(axes, ("ours", "naive")):
        color, label = styles[name]
        levels = results["recommend"][name]
        x = [lv["throughput_rps"] for lv in levels]
        ax.plot(x, [lv["p50"] for lv in levels], "o-", color=color, label="p50")
        ax.plot(x, [lv["p99"] for lv in levels], "s--", color=color, alpha=0.6, label="p99")
        for lv in levels:
            ax.annotate(f"c={lv['concurrency']}", (lv["throughput_rps"], lv["p99"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{label}: Recommend, {results['candidates']['mean']:.0f} candidates/request (mean)")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    half = results.get("half_load") or {}
    if half.get("achieved_rps"):
        axes[0].plot([half["achieved_rps"]] * 2, [half["p50"], half["p99"]], "D", color="tab:green", label="open loop at 50% of max (p50, p99)")
        axes[0].legend()
    fig.suptitle(f"ours max {results['recommend']['ours_max']['throughput_rps']:,.0f} req/s vs naive max "
                 f"{results['recommend']['naive_max']['throughput_rps']:,.1f} req/s ({results['throughput_ratio_vs_naive'] or float('nan'):.1f}x) - "
                 f"{results['machine'].get('cpus')} cores, client and server on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overlap(results: dict) -> str:
    short = [f"{name} c={lv['concurrency']}" for name in ("ours", "naive") for lv in results["recommend"][name]
             if lv.get("all_slots_overlapped") is False]
    return "yes" if not short else "no, at " + ", ".join(short) + " (there the whole level, first start to last answer, is used)"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


def _ms(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def _lag_text(lag: dict) -> str:
    if not lag.get("exported"):
        return f"Not exported: {lag.get('why', 'the server has no event-loop lag metric')}."
    workers = ", ".join(f"worker {w}: {v} ms" for w, v in (lag.get("max_ms_per_worker") or {}).items())
    parts = [f"Scraped from `/metrics` just before and just after the open-loop phase (half of max load, not saturated), with the "
             f"catalog refresh every 10 s and the registry polled every second (PERIODIC_OVERRIDES: 6x and 5x the defaults), so "
             f"the phase holds every kind of periodic work. "
             f"`propensity_event_loop_lag_max_seconds`, the largest lag since each worker started serving: **{_ms(lag.get('max_ms'))}**"
             + (f" ({workers})" if workers else "") + f"; it was {_ms(lag.get('max_ms_before_load'))} before the load."]
    if lag.get("samples_during_load") is not None:
        over = lag.get("samples_over_limit_during_load")
        bound = lag.get("max_bucket_bound_ms_during_load")
        parts.append(f"Between the two scrapes the histogram `propensity_event_loop_lag_seconds` took {lag['samples_during_load']:,} lag samples, "
                     + (f"{over:,} of them above {lag['limit_ms']:g} ms" if over is not None else f"({lag['limit_ms']:g} ms is not one of its bucket bounds)")
                     + (f"; all were at most {bound:g} ms (bucket bound)." if bound is not None else
                        "; some exceeded its largest bucket." if lag.get("over_largest_bucket") else "."))
    periodic = lag.get("periodic") or {}
    if periodic.get("exported"):
        tasks = periodic.get("samples_during_task") or {}
        over_tasks = periodic.get("samples_over_limit_during_task") or {}
        bounds = periodic.get("step_max_bucket_bound_ms_per_task") or {}
        steps = periodic.get("steps_per_task") or {}
        parts.append(
            "Under load, requests make lag too: a request runs on the loop from start to end, so a timer due behind two queued "
            "requests is late by both. The target is about periodic work, so the server also reports the lag samples whose window "
            "overlapped periodic work in any of its parts (on the loop, in the background thread, in the build process: "
            "`propensity_event_loop_lag_during_periodic_work_seconds`) and how long each periodic task's steps held the loop "
            f"(`propensity_periodic_loop_step_seconds`). While periodic work ran: **{periodic.get('samples_over_limit_during_periodic')} of "
            f"{periodic.get('samples_during_periodic')}** samples over {lag['limit_ms']:g} ms ({_percent(periodic.get('share_over_limit_during_periodic'))}); "
            f"the rest of the time: {periodic.get('samples_over_limit_outside_periodic')} of {periodic.get('samples_outside_periodic')} "
            f"({_percent(periodic.get('share_over_limit_outside_periodic'))}); one-sided Fisher test that periodic work makes more of them: "
            f"p = {periodic.get('excess_p_value')}. Per task (samples over the limit / samples; its steps on the loop, the longest "
            "within a bucket bound): "
            + "; ".join(f"{task}: {over_tasks.get(task)} / {tasks.get(task)}, {steps.get(task)} steps <= {bounds.get(task)} ms" for task in sorted(tasks))
            + f". Periodic steps over {lag['limit_ms']:g} ms: {periodic.get('steps_over_limit')}. The verdict: met when no periodic step held "
            "a loop over the limit and periodic work's samples are not over it more often than the rest (p >= 0.05).")
    else:
        parts.append(f"Verdict from the {lag.get('verdict_from')}.")
    sweep = lag.get("sweep")
    if sweep:
        parts.append(f"During the closed-loop sweep, for information (at saturation a ready request waits behind the queued ones, so lag "
                     f"there measures the queue, not a stall): {sweep.get('samples_over_limit_during_load')} of "
                     f"{sweep.get('samples_during_load')} samples over {lag['limit_ms']:g} ms, all at most "
                     f"{sweep.get('max_bucket_bound_ms_during_load')} ms.")
    after = lag.get("after_score_users")
    if after:
        parts.append(f"After the ScoreUsers phase (bulk calls, not periodic work), for information: max since start {_ms(after.get('max_ms'))}, "
                     f"{after.get('samples_over_limit_during_load')} samples over {lag['limit_ms']:g} ms during it.")
    return " ".join(parts)


def _user_read_rows(results: dict) -> str:
    rows = []
    for profile, r in results["user_read"].items():
        if r.get("user_read_p50_ms") is None:
            rows.append(f"| {profile} | not measured: {r.get('not_measured', '')} | | |")
        else:
            rows.append(f"| {profile} | {r['user_read_p50_ms']:.3f} | {r['user_read_p99_ms']:.3f} | {r['reads']:,} |")
    return "\n".join(rows)


# Share of their runnable time the serving workers spent waiting for a CPU above which a tail is called contention.
CONTENDED_SHARE = 0.1


def _sharing(half: dict) -> str:
    """Who had the cores during the open loop (bench.open_loop.ServerWatch), in words."""
    share = half.get("sharing")
    if not share:
        return ""
    text = (f"Who had the cores during the phase (docs/benchmarks/tail.md): the serving workers used {', '.join(f'{c:g}' for c in share['worker_cpu_seconds'])} "
            f"CPU seconds and waited {share['worker_run_queue_wait_seconds']:g} s in the run queue for a CPU, {share['worker_run_queue_wait_share']:.0%} "
            f"of the time they wanted one ({share['worker_run_queue_wait_ms_per_request']:g} ms per request; about 0 on an idle machine, and a "
            "large share means the tail is waiting for a core, not the serving code); the catalog build processes used "
            f"{share['build_cpu_seconds']:g} CPU seconds; the h2load processes {share['generator_cpu_seconds']:g}; the machine had "
            f"{share['machine_cores_busy']:g} cores busy in all.")
    if share["worker_run_queue_wait_share"] >= CONTENDED_SHARE:
        text += (f" **The workers waited for a core {share['worker_run_queue_wait_share']:.0%} of the time they were runnable: this tail is "
                 "mostly CPU contention on the machine, not what the serving code does on cores of its own.**")
    during = half.get("during_catalog_builds")
    if during and during.get("requests_due_during_builds"):
        text += (f" Requests due while a catalog build was running ({share['build_busy_seconds']:g} s of the phase): "
                 f"{during['requests_due_during_builds']:,}, p50 {during['p50_during_builds']:.2f} ms, p99 {during['p99_during_builds']:.2f} ms; "
                 f"the others: p50 {during['p50_otherwise']:.2f} ms, p99 {during['p99_otherwise']:.2f} ms.")
    return text


def readme(results: dict) -> str:
    floor = results["compute_floor"]
    cand = results["candidates"]
    score = results["score_users"]
    half = results["half_load"]
    users = results["users"]
    s = results["settings"]
    best = results["recommend"]["ours_max"]
    cpu = results["cpu_ms_per_request_at_saturation"]
    previous = results.get("previous")
    score_lines = "\n".join(f"| {r['concurrency']} | {r['batch_size']} | {r['calls']} | {r['users_per_second']:,.0f} | {r['call_p50_ms']} |" for r in score)
    notes = "\n".join(f"- {n}" for n in results["notes"])
    generator = (
        f"**The generator, not the server, limits this tail**: its own sends were late by {half['lateness_p99_ms']:.2f} ms at p99 "
        f"(max {half['lateness_max_ms']:.1f} ms) against a latency p99 of {half['p99']:.2f} ms, so the p99 above is partly the "
        "load generator waiting for a core it shares with the server."
        if half.get("generator_limited") else
        f"The generator kept its schedule (lateness p99 {half['lateness_p99_ms']:.3f} ms against a latency p99 of {half['p99']:.2f} ms), "
        "so the tail is the server's."
        if half.get("lateness_p99_ms", 0) < 1.0 else
        f"The generator's sends were late by {half['lateness_p99_ms']:.2f} ms at p99 (max {half['lateness_max_ms']:.1f} ms), small against "
        f"the latency p99 of {half['p99']:.2f} ms, so the tail is the server's (the generator shares the cores with the server, so a "
        "saturated server delays it too)."
    )
    rate_text = ("The offered rate was kept, so the tail is judged." if half.get("rate_kept") else
                 "**The offered rate was not achieved**, so this tail describes an overloaded server and is not judged against the target.")
    prev_text = (f"{previous['max_rps']:,.1f} req/s from {previous['path'].split('/')[-1]} of {previous['date']} "
                 f"({previous.get('users')} users), read before this run wrote anything"
                 if previous else "no previous results.json was found")
    return f"""# Benchmarks: Recommend, ScoreUsers and the naive reference

Generated by `python -m bench.run` on {results['machine'].get('date')}; the numbers below are from
[results.json](results.json). Re-run with:

```bash
{COMMAND}
```

It builds its own shop in `var/bench/` if missing ({s['demo_items']} items, {s['demo_users']} users;
`python -m bench.run --rebuild` redoes it), starts `propensity serve` with production settings
(`PROPENSITY_SERVER__WORKERS={s['server_workers']}`, JSON logs, metrics on) and the naive
server on free ports, drives both with h2load and an open-loop generator, and stops everything it
started. Machine: {results['machine'].get('cpus')} cores, load generators and servers on the same
cores (noisy, about +-15 %). Every figure below comes from this one run, baselines included.

![throughput vs latency](latency_throughput.png)

## Targets (issue 10)

{targets_table(results)}

`throughput_ratio_vs_previous` = this run's max / the previous max: {prev_text}.

## Users

{users['sampled_with_history']:,} sampled users with history (the personalised path); every one of them is sent once through
the generated stub before the load (answer with items, no fallback). Under load, {users['touched_by_any_recommend_load']:,} distinct
users were answered: {users['touched_by_closed_loop_sweep']:,} in the closed-loop h2load sweep and {users['touched_by_open_loop']:,}
in the open-loop phase (the naive server's sweep: {users['naive_sweep']}).

h2load posts the same body on every request, so one h2load process asks for one user. Each
level therefore keeps up to {max(lv.get('processes', 1) for lv in results['recommend']['ours'])} h2load processes ("slots") running side by side, and each slot
hands over to a new process for the next user of the list about every {best.get('segment_seconds')} s
({sum(lv.get('h2load_runs', 0) for lv in results['recommend']['ours'])} processes in the sweep), the slots at different moments,
continuing through the list across levels. A process repeats its user for its life. The open-loop
phase works the same way: {half.get('slots')} slots, each handing over to the next user {half.get('segments_per_slot')} times
during the phase. Shorter processes would take
the sweep alone through more users, but each one opens new connections: that costs the server CPU
and leaves the slot idle while the process starts against a saturated server, which would
understate throughput and overstate CPU per request (`--min-segment-seconds` sets the trade-off).

## Recommend under load (h2load, {s['seconds_per_level']:g} s per level)

Mean {cand['mean']:.1f} candidates per request (min {cand['min']}, max {cand['max']}, {cand['share_at_cap'] * 100:.0f} % at the
{cand['cap']} cap). Latencies in ms from h2load's `--log-file` (client-side, request start to end of response).
Server CPU = CPU time of all the server's processes during the level / Recommend calls it handled.

{table(results)}

A level is measured over the interval in which every slot was sending (from the request logs):
throughput = requests answered in that interval / its length, latency percentiles over the
requests that started in it. A new connection to a saturated server waits its turn, so the slots'
first requests were up to {best.get('start_stagger_ms', 'n/a')} ms apart at the max-throughput level; all slots
overlapped at every level: {_overlap(results)}. The requests in flight when a process's time was
up ({best.get('in_flight_at_stop', 0):,} at the max-throughput level, against {best['requests']:,} answered) are not
counted by h2load, but most are still served: CPU per request therefore divides by the calls the
server itself counted ({best.get('server_handled', 'n/a')} at that level; {best.get('cpu_per', '')}).

## CPU per request at saturation

At the max-throughput level (c={best['concurrency']}): **{_ms(cpu['ours'])}** of server CPU per request for
`propensity serve`, {_ms(cpu['naive'])} for the naive server at its own max. {cpu['how']}. Steadier than
req/s on this shared machine: the load generator's share of the cores does not enter it. For scale,
the in-process floor (user read + scoring, one thread, no gRPC) is {floor['with_feast_user_read_p50_ms']:.3f} ms p50;
the server adds gRPC, protobuf, logging and metrics to it, so a figure far below the floor would
mean the load was served from a cache. In the open-loop phase (a new user on every request, half
of max load) the server spent {_ms(half.get('server_cpu_ms_per_request'))} per request; below saturation it also pays
for waking up for each request, so that figure is not the saturation cost.

## Tail at half of max throughput (open loop)

h2load in rate mode (`--rps`, bench/open_loop.py): {half.get('slots')} connections side by side (SO_REUSEPORT spreads
them over the workers), each sending one user's Recommend at {half.get('rps_per_connection')} req/s whatever the earlier
answers did (up to {half.get('streams_per_connection')} outstanding per connection) and handing over to the next user about
{half.get('segments_per_slot')} times; {half.get('distinct_users_answered')} users. Latency runs from the time each request
was due (h2load's --log-file gives the actual start and the elapsed time). h2load is C, but starting a process per
hand-over costs CPU too: the h2load processes' CPU during the phase is measured (below).

| | p50 | p95 | p99 | max |
|---|---:|---:|---:|---:|
| latency from the scheduled send (ms) | {half['p50']:.2f} | {half['p95']:.2f} | {half['p99']:.2f} | {half['max']:.1f} |
| service time from the actual send (ms) | {half['service_p50']:.2f} | | {half['service_p99']:.2f} | |
| generator lateness: actual send - scheduled (ms) | {half['lateness_p50_ms']:.3f} | | {half['lateness_p99_ms']:.3f} | {half['lateness_max_ms']:.1f} |

Target {half['target_rate_rps']:,.0f} req/s, achieved {half['achieved_rps']:,.0f} req/s; {half['requests']:,} requests,
{half['failures']} failures; {half['late_over_1ms']:,} sends more than 1 ms late. {rate_text} The h2load processes ran on the server's own cores, scheduled {', '.join(half.get('generator_scheduling') or ['(not recorded)'])}; a real client runs on other machines.
Server CPU during the phase: {half.get('server_cores_busy', 'n/a')} cores busy. {generator}
For comparison, the closed-loop h2load level nearest half of max: {_nearest(half)} (a closed loop sends nothing while
its request waits, so a stall delays one request there and every request due during it here: the tails are not comparable).
{_sharing(half)}

## Event-loop lag

{_lag_text(results['event_loop_lag'])}

## Compute floor and the user read (in-process, no gRPC)

Per request over the {floor['requests_per_variant']:,} sampled users, each once:
- scoring only (UserState.from_row, user model, candidates, pair_matrix, ranker with `num_threads=1`, top-k): **{floor['scoring_p50_ms']:.3f} ms** p50 (p99 {floor['scoring_p99_ms']:.3f} ms)
- plus the user's online read as the server does it (`server.online_features.OnlineUserFeatures(store, "{s.get('user_feature_service')}").fetch([user])`): **{floor['with_feast_user_read_p50_ms']:.3f} ms** (p99 {floor['with_feast_user_read_p99_ms']:.3f} ms)

The user read + decode alone, per online store (same reader, the bench shop's user rows):

| online store | p50 ms | p99 ms | reads |
|---|---:|---:|---:|
{_user_read_rows(results)}

SQLite: {results['user_read']['sqlite'].get('store')}. Redis: {results['user_read']['redis'].get('store')}.

Server time = {results['server_time']['how']}:
{results['server_time']['value_ms']:.3f} ms (Health Check p50 {results['health_check_c1']['p50']:.3f} ms).

## ScoreUsers (1,000 user ids per call)

| concurrency | ids per call | calls | users/s | call p50 ms |
|---:|---:|---:|---:|---:|
{score_lines}

{firehose_section(results.get("firehose"))}

## How it is measured

- h2load posts `/propensity.v1.RecommendationService/Recommend` with `content-type: application/grpc`
  and `te: trailers`; the body is a 5-byte gRPC frame prefix + a serialized `RecommendRequest`
  (`-d FILE`), one file per user. Each h2load process runs `-c` connections x `-m` streams with
  `-D` (duration) and `--log-file`; the bench replaces it by the next user's when its time is up.
- h2load counts any HTTP 200 as success. Before the load, every payload is sent once through the
  generated stub (must succeed, with items, no fallback) and its response size recorded; under load
  an error answer has trailers only, so DATA bytes / response size must equal the answered count;
  the shortfall is reported as failures.
- Concurrency = h2load connections x streams per connection summed over processes (several
  connections: SO_REUSEPORT balances per connection).
- Server CPU: `/proc/<pid>/stat` utime + stime + cutime + cstime of every process in the server's
  process group (the parent and its workers), before and after each level.
- Event-loop lag: the server's `/metrics` (PROPENSITY_SERVER__METRICS_PORT; with workers the parent
  serves the aggregate of all of them) is scraped after the warm-up and after the Recommend load.
- ghz configs for the same calls are in `loadtest/` (ghz is not installable here).

## Notes

{notes}
"""


def firehose_section(firehose: dict | None) -> str:
    """The event firehose (bench/firehose.py): IngestEvents events/s per message size, Recommend beside it, freshness."""
    head = "## Event firehose: IngestEvents into one server process (issue 15)\n\n"
    if not firehose or "sizes" not in firehose:
        return head + f"Not measured in this run ({(firehose or {}).get('not_measured', 'no firehose figures in results.json')}).\n"
    rows = "\n".join(
        f"| {r['events_per_message']:,} | {r['events_per_second']:,.0f} | {r['server_cpu_ms_per_1000_events']} | {r['server_cores_busy']} "
        f"| {r['generator_cores_busy']} | {r['accepted']:,} / {r['events_sent']:,} | {r['failed_streams']} |"
        for r in firehose["sizes"]
    )
    alone, during = firehose["recommend_alone"], firehose["recommend_under_half_ingestion"]
    took = during["ingestion"]
    fresh = firehose["freshness"]
    full = fresh["ingestion"]
    probes = "\n".join(
        f"| {p['user']} | {p['item']} | {p['ack_ms']} | {p['next_answer_ms']} | {'yes' if p['raised_in_next_answer'] else 'no'} "
        f"| {p['visible_ms'] if p['visible_ms'] is not None else 'not within 3 s'} |"
        for p in fresh["probes"]
    )

    def tail(r: dict) -> str:
        return (f"| {r['target_rate_rps']:g} | {r['achieved_rps']:g} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['max']:.1f} "
                f"| {r['failures']} | {r['lateness_p99_ms']} |")

    return head + f"""{firehose['server']}; generator: {firehose['generator']}. Every message is acknowledged only once its events are
committed to the event log (one transaction per message) and their real-time features written (one online write per user
and view); accepted must equal sent. Generator cores busy = the load processes' own CPU seconds per wall second.

| events/message | events/s | server CPU ms / 1,000 events | server cores busy | generator cores busy | accepted / sent | failed streams |
|---:|---:|---:|---:|---:|---:|---:|
{rows}

Recommend at a fixed {firehose['recommend_rate_rps']:g} req/s (h2load --rps, users not in the firehose's events), alone and while
1,000-event messages are offered at half the maximum above ({took.get('offered_events_per_second', 0):,.0f} events/s; the server took
{took['events_per_second']:,.0f} events/s, {took['server_cores_busy']} server cores busy):

| Recommend | offered req/s | achieved req/s | p50 ms | p95 ms | p99 ms | max ms | failures | generator lateness p99 ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| alone {tail(alone)}
| with ingestion at half its max {tail(during)}

Freshness at full ingestion load ({full['events_per_second']:,.0f} events/s of 1,000-event messages meanwhile): a view and an
add-to-cart for (user, item), the item the user scored lowest, then Recommend for that user with the item as its only candidate.
**{fresh['fresh_within']} of {fresh['probes_sent']}** raised the item's score within {fresh['within_seconds']:g} s of sending
({fresh['raised_in_next_answer']} in the very next answer; slowest {fresh['visible_ms_max']} ms).

| user | item | ack ms | next answer ms (from send) | raised in the next answer | raised after ms |
|---|---|---:|---:|---|---:|
{probes}
"""


def _nearest(half: dict) -> str:
    level = half.get("closed_loop_level_nearest_half_max")
    if not level:
        return "n/a"
    return (f"c={level['concurrency']}, {level['throughput_rps']:,.0f} req/s, p50 {level['p50']:.2f} ms, p99 {level['p99']:.2f} ms "
            f"(p99/p50 {level['p99'] / level['p50']:.2f})")


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / "latency_throughput.png")
    (out_dir / "README.md").write_text(readme(results))
