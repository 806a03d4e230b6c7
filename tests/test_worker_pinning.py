"""A serving worker is pinned to a CPU of its own only when there is one worker per CPU; its build process is not."""

from __future__ import annotations

import multiprocessing
import os

from server.build_process import _any_cpu
from server.workers import pin_to_own_cpu


def _in_child(fn, *args):
    """fn(*args) in a forked process (affinity changes must not leak into the test process); its result."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=lambda: queue.put(fn(*args)))
    process.start()
    result = queue.get(timeout=30)
    process.join(timeout=30)
    return result


def _pin_then_report(number: int, workers: int) -> tuple[int | None, list[int]]:
    cpu = pin_to_own_cpu(number, workers)
    return cpu, sorted(os.sched_getaffinity(0))


def _pin_then_free(number: int, workers: int) -> list[int]:
    pin_to_own_cpu(number, workers)
    _any_cpu()
    return sorted(os.sched_getaffinity(0))


def test_one_worker_per_cpu_each_on_its_own_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    seen = [_in_child(_pin_then_report, number, len(cpus)) for number in range(len(cpus))]
    assert [cpu for cpu, _ in seen] == cpus
    assert [allowed for _, allowed in seen] == [[cpu] for cpu in cpus]


def test_not_pinned_when_workers_and_cpus_differ():
    cpus = sorted(os.sched_getaffinity(0))
    assert _in_child(_pin_then_report, 0, len(cpus) + 1) == (None, cpus)


def test_build_process_leaves_its_workers_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    assert _in_child(_pin_then_free, len(cpus) - 1, len(cpus)) == cpus
