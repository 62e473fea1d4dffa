"""durable-monty-nb: durable notebook workflows on the Monty sandbox.

From a script::

    from durable_monty_nb import Engine
    Engine("runs.db").run(code, namespace=globals(), key="demo")

In IPython or Jupyter::

    %load_ext durable_monty_nb
"""

from .engine.controls import CallControls, Rate, RetryAfter, limits
from .engine.driver.switching import set_switch_interval
from .engine.engine import Engine
from .engine.events import (
    CallFailed,
    CallRetrying,
    Event,
    ExecutionFinished,
    ExecutionStarted,
    Printed,
)
from .engine.fingerprint import not_inputs
from .engine.options import RunOptions
from .engine.retry import RetryPolicy, retry
from .engine.run import CallView, Progress, Run
from .errors import (
    DurableError,
    ExecutionBusy,
    ExecutionInterrupted,
    ExecutionNotFound,
    ForgetRefused,
    MissingFunctionsError,
    StoreError,
    StoreVersionError,
    TamperedDataError,
    UnknownNamesError,
    ValueCrossingError,
    WorkflowCodeError,
    WorkflowFailed,
)
from .executors.registry import register_executor
from .signals import external

__version__ = "0.1.0"

__all__ = [
    "CallControls",
    "CallFailed",
    "CallRetrying",
    "CallView",
    "DurableError",
    "Engine",
    "Event",
    "ExecutionBusy",
    "ExecutionFinished",
    "ExecutionInterrupted",
    "ExecutionNotFound",
    "ExecutionStarted",
    "ForgetRefused",
    "MissingFunctionsError",
    "Printed",
    "Progress",
    "Rate",
    "RetryAfter",
    "RetryPolicy",
    "Run",
    "RunOptions",
    "StoreError",
    "StoreVersionError",
    "TamperedDataError",
    "UnknownNamesError",
    "ValueCrossingError",
    "WorkflowCodeError",
    "WorkflowFailed",
    "external",
    "limits",
    "load_ipython_extension",
    "not_inputs",
    "register_executor",
    "retry",
    "set_switch_interval",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """``%load_ext durable_monty_nb``: register the %%durable magics."""
    from .notebook.magics import load_extension

    load_extension(ipython)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    from .notebook.magics import unload_extension

    unload_extension(ipython)
