"""Append cost of the two event log backends: `python bench/event_log_append.py EVENTS_PER_MESSAGE MESSAGES`.

Each message is one durable append (one transaction, fsync'd / WAL-flushed before it returns), as IngestEvents
does per message. Needs the local PostgreSQL (127.0.0.1:5432, trust auth); uses and drops a database propensity_bench_event_log.
"""
import sys, tempfile, time
from pathlib import Path
import psycopg
from propensity.event_log import EventLog, StreamEvent
from propensity.event_log_postgres import PostgresEventLog

size, messages = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (100, 200)
with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
    c.execute("DROP DATABASE IF EXISTS propensity_bench_event_log WITH (FORCE)"); c.execute("CREATE DATABASE propensity_bench_event_log")
logs = {"sqlite": EventLog(Path(tempfile.mkdtemp())), "postgres": PostgresEventLog("postgresql://postgres@127.0.0.1:5432/propensity_bench_event_log", "bench")}
for name, log in logs.items():
    log.count()
    batches = [[StreamEvent(f"{name}-{m}-{i}", 1_764_000_000_000 + i, f"u{i % 50}", f"i{i % 80}", "view") for i in range(size)] for m in range(messages)]
    t0 = time.perf_counter()
    for batch in batches:
        log.append(batch)
    dt = time.perf_counter() - t0
    print(f"{name}: {messages} messages x {size} events: {dt / messages * 1000:.2f} ms per message, {messages * size / dt:,.0f} events/s")
    log.close()
with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
    c.execute("DROP DATABASE IF EXISTS propensity_bench_event_log WITH (FORCE)")
