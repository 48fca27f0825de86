"""The executor the lrm nodes spin on: a task that waits for a worker thread is submitted once, not once
per pass of the executor loop (stock rclpy resubmits it, which starved refinement_node under load)."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.ros


@pytest.fixture
def context():
    import rclpy

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def _pass_same_task_while_the_pool_is_busy(executor, passes: int) -> tuple[int, list[int]]:
    """The only worker is blocked; the loop is handed the same ready task `passes` times. Returns how many
    items the pool queued, and how often the task ran once the worker was free."""
    from rclpy.task import Task

    gate = threading.Event()
    executor._executor.submit(gate.wait)
    runs: list[int] = []
    task = Task(lambda: runs.append(1), executor=executor)
    executor.wait_for_ready_callbacks = lambda *args, **kwargs: (task, None, None)
    for _ in range(passes):
        executor._spin_once_impl(0.0)
    queued = executor._executor._work_queue.qsize()
    gate.set()
    deadline = time.monotonic() + 10.0
    while not task.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown()
    return queued, runs


def test_a_task_waiting_for_a_worker_is_submitted_once(context):
    from lrm_reward.ros.spinning import SubmitOnceExecutor

    queued, runs = _pass_same_task_while_the_pool_is_busy(SubmitOnceExecutor(1, context=context), 50)
    assert queued == 1 and runs == [1]


def test_stock_rclpy_resubmits_it(context):
    """Why SubmitOnceExecutor exists: if this starts failing, rclpy fixed it and the subclass can go."""
    from rclpy.executors import MultiThreadedExecutor

    queued, runs = _pass_same_task_while_the_pool_is_busy(MultiThreadedExecutor(1, context=context), 50)
    assert queued == 50 and runs == [1]
