"""The driver of one execution, one module per job:

- :mod:`.loop`: the thread and its loop (:class:`Driver`, :class:`Settings`);
- :mod:`.protocol`: talking to the Monty session;
- :mod:`.ledger`: the journal of calls, commits, reuse and restore;
- :mod:`.book`: each call's status, answer and counters (the only writer of a status);
- :mod:`.scheduling`: dispatch, outcomes, timers and attaching to attempts in flight;
- :mod:`.components`: the narrow interface through which the parts below reach the loop;
  :mod:`.limiting` (call controls), :mod:`.retries`, :mod:`.waits` (sleeps, signals, external
  calls, the mailbox), each a component that owns its state;
- :mod:`.clock`: the time the driver reads (a settable one for tests);
- :mod:`.finishing`: completion and failure;
- :mod:`.switching`: the interpreter's thread switch interval while drivers run;
- :mod:`.calls` and :mod:`.exceptions`: call records and how exceptions cross into the sandbox.
"""

from .calls import CallState, stored_call_views
from .exceptions import format_monty_error
from .loop import Driver, Settings, default_printer
from .protocol import is_function_like

__all__ = [
    "CallState",
    "Driver",
    "Settings",
    "default_printer",
    "format_monty_error",
    "is_function_like",
    "stored_call_views",
]
