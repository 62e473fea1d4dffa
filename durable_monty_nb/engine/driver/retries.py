"""Retries as a component of the driver: a failed attempt runs again after the wait its
function's retry policy (``@retry``, else the run's default) asks for; when the policy says
no more, the failure is the call's.

It sees a failure after the call controls (a ``RetryAfter`` is not a failure) and after lost
attempts (run again at once, not counted), through the ``failed`` hook; the retry's timer
brings the call back to the loop like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..retry import RetryPolicy, policy_for
from .components import Component, Loop
from .exceptions import last_message

if TYPE_CHECKING:
    from ...executors.base import Outcome
    from .calls import CallState


class Retries(Component):
    """The retry policies of a run's functions (see the module docstring)."""

    def __init__(self, loop: Loop, default: RetryPolicy) -> None:
        self._loop = loop
        self._default = default
        self._policies: dict[str, RetryPolicy] = {}

    def policy(self, function: str) -> RetryPolicy:
        found = self._policies.get(function)
        if found is None:
            found = self._policies[function] = policy_for(self._loop.function(function), self._default)
        return found

    def failed(self, state: CallState, outcome: Outcome) -> bool:
        """Schedule the call's next attempt when its policy allows one (True), else leave the failure."""
        error = outcome.error
        policy = self.policy(state.function)
        if error is None or not policy.should_retry(state.policy_attempts, error):
            return False
        wait = policy.wait_before(state.policy_attempts)
        due = self._loop.clock.now() + wait  # from when the driver learns of it, by its clock
        self._loop.book.transition_pending_retrying(state, due, error_text=error.traceback, error_type=error.type_name)
        self._loop.push_timer(due, state)
        self._loop.emit_retrying(state, wait, last_message(error.traceback))
        return True
