"""How every lrm node process runs and ends: spin until Ctrl-C / SIGTERM / ros shutdown, then stop the
node's own threads, destroy it and shut rclpy down — exit code 0 for a requested stop.

Not for building nodes or parsing arguments: each node's ``main`` does that, then hands over here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

import rclpy
from rclpy.executors import (
    ConditionReachedException,
    Executor,
    ExternalShutdownException,
    MultiThreadedExecutor,
    ShutdownException,
    SingleThreadedExecutor,
    TimeoutException,
)
from rclpy.node import Node


class SubmitOnceExecutor(MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor, minus a feedback loop that starves callbacks under load.

    rclpy yields every task that is queued but not yet running again on each pass of its loop (that is how
    it resumes coroutines), and the MultiThreadedExecutor submits it to its pool again. A worker needs the
    GIL to start a task, so on a busy machine the executor thread resubmits the same tasks thousands of
    times, takes a whole core and the callbacks starve: refinement_node lost half of its camera frames
    after its first save (benchmarks/bench_recorder_node.py). Here a task waiting for a worker is not
    submitted twice; the loop yields the GIL instead. Relies on MultiThreadedExecutor's `_executor` pool and
    `_futures` list (rclpy Kilted); tests/ros/test_spinning.py checks that they are still there.
    """

    def __init__(self, num_threads: int, *, context=None) -> None:
        super().__init__(num_threads=num_threads, context=context)
        self._waiting: set = set()  # tasks submitted to the pool that no worker has started yet
        self._waiting_lock = threading.Lock()

    def _spin_once_impl(self, timeout_sec=None, wait_condition=lambda: False) -> None:
        try:
            handler, _entity, _node = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        with self._waiting_lock:
            queued = handler in self._waiting
            self._waiting.add(handler)
        if queued:
            time.sleep(0)  # let a worker take the GIL and start it
            return
        self._executor.submit(self._start, handler)
        self._futures.append(handler)
        for future in self._futures[:]:
            if future.done():
                self._futures.remove(future)
                future.result()  # raise any exception of a callback, as rclpy does

    def _start(self, handler) -> None:
        with self._waiting_lock:
            self._waiting.discard(handler)
        handler()


def thread_per_entity(node: Node, extra: int = 0) -> SubmitOnceExecutor:
    """A SubmitOnceExecutor with a thread for every subscription, service, client and timer of `node`, so
    that a service waiting seconds (a save, a judge run) never leaves a callback waiting for a thread.
    Idle threads cost nothing. `extra`: more threads, e.g. for an action client that a waiting service
    needs served meanwhile (its responses arrive through the executor too)."""
    entities = [*node.subscriptions, *node.services, *node.clients, *node.timers]
    return SubmitOnceExecutor(num_threads=len(entities) + 1 + extra)


def spin_until_shutdown(
    node: Node, executor: Executor | None = None, startup: Callable[[], object] | None = None
) -> int:
    """Run ``startup`` (e.g. lifecycle autostart: loading a model can take a minute), then spin ``node`` on
    ``executor`` (single-threaded by default) until shutdown. Ctrl-C during either is a clean stop.

    ``node.shutdown_cleanly()`` (when the node has one) stops its worker threads before it is destroyed.
    """
    executor = executor or SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if startup is not None:
            startup()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # SIGINT / SIGTERM: a requested, clean stop
    except Exception:
        # SIGTERM's handler can shut the context down between two waits: rclpy then raises RCLError
        # ("context is not valid") instead of ExternalShutdownException. Still a requested stop.
        if node.context.ok():
            raise
    finally:
        # Ctrl-C in a terminal reaches a launched node twice (the terminal's process group, then ros2 launch
        # passing it on): a second SIGINT must not cut the cleanup short with a KeyboardInterrupt.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(node, "shutdown_cleanly"):
            node.shutdown_cleanly()
        executor.shutdown()
        node.destroy_node()
        with contextlib.suppress(Exception):  # already shut down by the signal handler
            rclpy.try_shutdown()
    return 0
