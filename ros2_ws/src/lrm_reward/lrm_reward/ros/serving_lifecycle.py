"""The teardown transitions shared by the project's lifecycle nodes (reward_node, policy_node).

Both serve while active and hold a loaded model or policy while configured: deactivate stops serving,
cleanup releases what configure loaded, shutdown and error do both. A node mixes this in before
LifecycleNode and defines `_stop_serving()` and `_release()`; configure and activate stay its own.
"""

from __future__ import annotations

from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn


class ServingLifecycleMixin:
    """on_deactivate / on_cleanup / on_shutdown / on_error in terms of _stop_serving() and _release()."""

    def _stop_serving(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self._release()
        return TransitionCallbackReturn.SUCCESS
