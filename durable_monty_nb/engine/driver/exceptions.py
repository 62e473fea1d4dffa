"""How exceptions cross into the sandbox: by name, as Monty can raise them."""

from __future__ import annotations

import re
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


def format_monty_error(
    exc: MontyError, key: str, *, sandbox_hint: bool = True, sources: tuple[str, str] | None = None
) -> str:
    """Monty's traceback, with the workflow named and a hint for errors users often meet.

    ``sandbox_hint``: explain Monty's partial standard library on an import error (not when the
    error was raised by a notebook function, where the sandbox is not the cause). ``sources``:
    (the user's code, the code Monty ran), when they differ (batched gathers): frames show the
    user's lines.
    """
    try:
        text = exc.display()  # type: ignore[attr-defined]
    except Exception:
        text = str(exc)
    if sources is not None and sources[0] != sources[1]:
        text = user_lines(text, *sources)
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


_FRAME = re.compile(r'^  File "<python-input-1>", line (\d+)')
_MARKS = frozenset(" ^~")


def user_lines(text: str, code: str, fed: str) -> str:
    """A traceback of the code Monty ran with the user's lines where that code was rewritten
    (same line numbers: see :func:`..analysis.rewrite_gathers`)."""
    user, ran = code.splitlines(), fed.splitlines()
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        match = _FRAME.match(line)
        if match is None:
            continue
        first = int(match.group(1)) - 1
        block = []
        while i < len(lines) and lines[i].startswith("    "):
            block.append(lines[i])
            i += 1
        shown = [b for b in block if not set(b) <= _MARKS]  # source lines, without the carets
        if all(ran[n] == user[n] for n in range(first, min(first + max(len(shown), 1), len(ran), len(user)))):
            out += block
            continue
        indent = min((len(u) - len(u.lstrip()) for u in user[first : first + len(shown)] if u.strip()), default=0)
        out += ["    " + u[indent:] for u in user[first : first + max(len(shown), 1)]]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
