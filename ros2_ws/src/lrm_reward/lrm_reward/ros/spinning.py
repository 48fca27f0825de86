"""How every lrm node process runs and ends: spin until Ctrl-C / SIGTERM / ros shutdown, then stop the
node's own threads, destroy it and shut rclpy down — exit code 0 for a requested stop.

Not for building nodes or parsing arguments: each node's ``main`` does that, then hands over here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node


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
    finally:
        if hasattr(node, "shutdown_cleanly"):
            node.shutdown_cleanly()
        executor.shutdown()
        node.destroy_node()
        with contextlib.suppress(Exception):  # already shut down by the signal handler
            rclpy.try_shutdown()
    return 0
