"""A serving worker is pinned to a CPU of its own only when there is one worker per CPU; its build process is not."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from server.build_process import BuildProcess
from server.workers import pin_to_own_cpu
from tests.conftest import Pipeline, private_env, running_server


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


def _build_process_cpus() -> list[int]:
    """The CPUs a build process started from here may use (a real helper process, asked over its socket)."""
    builder = BuildProcess()
    try:
        return sorted(builder.call(os.sched_getaffinity, 0))
    finally:
        builder.close()


def _pin_then_build(number: int, workers: int) -> tuple[list[int], list[int]]:
    pin_to_own_cpu(number, workers)
    return sorted(os.sched_getaffinity(0)), _build_process_cpus()


def _narrowed_then_build(cpu: int, workers: int) -> tuple[int | None, list[int]]:
    """As under `taskset -c cpu`: the process may use one CPU only, then the worker start-up runs."""
    os.sched_setaffinity(0, {cpu})
    return pin_to_own_cpu(0, workers), _build_process_cpus()


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
    assert _in_child(_pin_then_build, len(cpus) - 1, len(cpus)) == ([cpus[-1]], cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to narrow the set")
def test_build_process_never_leaves_the_servers_cpu_set():
    """A server started on a subset of the CPUs (taskset) keeps its build process inside that subset."""
    cpus = sorted(os.sched_getaffinity(0))
    assert _in_child(_narrowed_then_build, cpus[-1], 2) == (None, [cpus[-1]])


def _affinity(pid: int) -> list[int]:
    return sorted(os.sched_getaffinity(pid))


def _workers_of(pid: int) -> list[int]:
    return sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("pin", [True, False])
def test_a_real_server_pins_its_workers_only_when_set(pipeline: Pipeline, pin: bool, tmp_path: Path) -> None:
    """`propensity serve` with one worker per CPU: each worker on a CPU of its own with server.pin_workers, none pinned without."""
    cpus = _affinity(0)
    env, _ = private_env(pipeline, f"pinning-{pin}", workers=len(cpus), pin_workers=pin)
    with running_server(env, tmp_path / "serve.log") as server:
        workers = _workers_of(server.process.pid)
        assert len(workers) == len(cpus), workers
        seen = [_affinity(worker) for worker in workers]
        if pin:
            assert sorted(cpu for allowed in seen for cpu in allowed) == cpus and all(len(allowed) == 1 for allowed in seen), seen
        else:
            assert seen == [cpus] * len(cpus), seen
        assert _affinity(server.process.pid) == cpus  # the supervisor is never pinned
