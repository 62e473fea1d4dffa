"""How exceptions cross into the sandbox: by name, as Monty can raise them."""

from __future__ import annotations

from typing import Any

from pydantic_monty import MontyError

from ...errors import last_line
from ...executors.base import ErrorInfo

# Exception types Monty can raise inside the sandbox by name (see pydantic_monty.ExcType).
SANDBOX_EXCEPTIONS = frozenset(
    (
        "Exception",
        "BaseException",
        "ArithmeticError",
        "OverflowError",
        "ZeroDivisionError",
        "LookupError",
        "IndexError",
        "KeyError",
        "RuntimeError",
        "NotImplementedError",
        "RecursionError",
        "AttributeError",
        "NameError",
        "UnboundLocalError",
        "ValueError",
        "UnicodeDecodeError",
        "UnicodeEncodeError",
        "ImportError",
        "ModuleNotFoundError",
        "OSError",
        "FileNotFoundError",
        "FileExistsError",
        "IsADirectoryError",
        "NotADirectoryError",
        "PermissionError",
        "AssertionError",
        "MemoryError",
        "StopIteration",
        "SyntaxError",
        "TimeoutError",
        "TypeError",
    )
)


def sandbox_exception_type(error: ErrorInfo | None) -> str:
    """The most specific builtin exception of ``error``'s classes that the sandbox can raise."""
    if error is None:
        return "Exception"
    for name in error.types:
        module, _, short = name.rpartition(".")
        if module == "builtins" and short in SANDBOX_EXCEPTIONS:
            return short
    return "Exception"


def error_answer(exc_type: str | None, message: str | None) -> dict[str, Any]:
    """Monty's answer that raises ``exc_type(message)`` in the sandbox."""
    return {"exc_type": exc_type if exc_type in SANDBOX_EXCEPTIONS else "Exception", "message": message or ""}


def last_message(text: str | None) -> str:
    """The message of the last line of a traceback (``ValueError: bad`` -> ``bad``)."""
    last = last_line(text)
    head, sep, tail = last.partition(": ")
    return tail if sep and " " not in head.strip() else last


def format_monty_error(exc: MontyError, key: str, *, sandbox_hint: bool = True) -> str:
    """Monty's traceback, with the workflow named and a hint for errors users often meet.

    ``sandbox_hint``: explain Monty's partial standard library on an import error (not when the
    error was raised by a notebook function, where the sandbox is not the cause).
    """
    try:
        text = exc.display()  # type: ignore[attr-defined]
    except Exception:
        text = str(exc)
    text = text.replace('File "<python-input-1>"', f'File "<workflow {key}>"')
    try:
        inner = exc.exception()  # type: ignore[attr-defined]
    except Exception:
        inner = None
    if sandbox_hint and isinstance(inner, ModuleNotFoundError):
        text += (
            "\nWorkflow code runs in the Monty sandbox, which offers only part of the standard library "
            "(asyncio, math, json, re, datetime, ...). Import other modules inside a notebook function "
            "and call that function from the workflow."
        )
    return text
