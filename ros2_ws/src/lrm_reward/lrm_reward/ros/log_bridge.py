"""Python ``logging`` of the lrm_reward core, forwarded to a node's ROS logger (console, /rosout, rqt).

What this is for: the core (``lrm_reward.core.*``, and the refinement helpers) logs with the standard
``logging`` module, so it stays free of rclpy; without this, its warnings (warm-up, fast-path fallbacks,
adapters, out-of-memory retries) would reach neither /rosout nor rqt_console. Each node's ``main`` wraps its
spin in ``forward_core_logging(node)``: a handler on the ``lrm_reward`` logger sends every record to the
node's rclpy logger at the matching severity, and is removed again when the node shuts down.
What it is not: a general logging configuration; records of other libraries (torch, transformers) stay where
they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rclpy.impl.rcutils_logger import RcutilsLogger
from rclpy.logging import LoggingSeverity

CORE_LOGGER = "lrm_reward"


def rcl_severity(levelno: int) -> LoggingSeverity:
    """The ROS severity of a Python level (DEBUG, INFO, WARN, ERROR, FATAL); levels in between round down."""
    if levelno >= logging.CRITICAL:
        return LoggingSeverity.FATAL
    if levelno >= logging.ERROR:
        return LoggingSeverity.ERROR
    if levelno >= logging.WARNING:
        return LoggingSeverity.WARN
    if levelno >= logging.INFO:
        return LoggingSeverity.INFO
    return LoggingSeverity.DEBUG


class RosLogHandler(logging.Handler):
    """Sends each record to an rclpy logger as "<python logger>: <message>" (traceback appended)."""

    def __init__(self, ros_logger: RcutilsLogger) -> None:
        super().__init__(logging.DEBUG)
        self.ros_logger = ros_logger
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # one call site per severity: rclpy refuses a call site that logs at changing severities
        try:
            text = self.format(record)
            severity = rcl_severity(record.levelno)
            if severity == LoggingSeverity.FATAL:
                self.ros_logger.fatal(text)
            elif severity == LoggingSeverity.ERROR:
                self.ros_logger.error(text)
            elif severity == LoggingSeverity.WARN:
                self.ros_logger.warning(text)
            elif severity == LoggingSeverity.INFO:
                self.ros_logger.info(text)
            else:
                self.ros_logger.debug(text)
        except Exception:  # a log line must never take a node down (e.g. logged after rclpy shut down)
            self.handleError(record)


def install(node, logger_name: str = CORE_LOGGER) -> RosLogHandler:
    """Forward `logger_name` (and its children) to the node's logger from now on; returns the handler.

    The Python logger's level follows the node's (``--log-level``): INFO by default, so the core's INFO lines
    (warm-up, loaded adapters) arrive as well.
    """
    ros_logger = node.get_logger()
    handler = RosLogHandler(ros_logger)
    python_logger = logging.getLogger(logger_name)
    handler.previous_level = python_logger.level
    python_logger.setLevel(int(ros_logger.get_effective_level()))
    python_logger.addHandler(handler)
    return handler


def remove(handler: RosLogHandler, logger_name: str = CORE_LOGGER) -> None:
    """Stop forwarding (at node shutdown); restores the logger's previous level."""
    python_logger = logging.getLogger(logger_name)
    python_logger.removeHandler(handler)
    if not any(isinstance(h, RosLogHandler) for h in python_logger.handlers):
        python_logger.setLevel(getattr(handler, "previous_level", logging.NOTSET))


@contextlib.contextmanager
def forward_core_logging(node, logger_name: str = CORE_LOGGER) -> Iterator[RosLogHandler]:
    """install() for the block, remove() after it, however it ends."""
    handler = install(node, logger_name)
    try:
        yield handler
    finally:
        remove(handler, logger_name)
