"""Tracebacks as a notebook shows them: frames of notebook cells read ``Cell In[2], line 7``.

The engine records tracebacks as Python formats them, with the file names IPython compiles
cells under (``/tmp/ipykernel_1234/3456.py``, ``<ipython-input-2-...>``). The face rewrites
them when it shows them, with IPython's own labels (``shell.compile.format_code_name``), and
names a workflow by the name the user gave it (without its notebook).
"""

from __future__ import annotations

import re
from typing import Any

from .scope import display_name

_FRAME = re.compile(r'File "(?P<file>[^"\n]+)", line (?P<line>\d+)')
_WORKFLOW = "<workflow "


def relabel(text: str, shell: Any) -> str:
    """``text`` with the frames of this kernel's cells labelled as IPython labels them."""
    if not text:
        return text
    compiler = getattr(shell, "compile", None)
    label_of = getattr(compiler, "format_code_name", None)

    def frame(match: re.Match[str]) -> str:
        file, line = match.group("file"), match.group("line")
        if file.startswith(_WORKFLOW) and file.endswith(">"):
            return f'File "{_WORKFLOW}{display_name(file[len(_WORKFLOW) : -1])}>", line {line}'
        try:
            found = label_of(file) if label_of is not None else None
        except Exception:
            found = None
        if not found:
            return match.group(0)
        label, name = found
        return f"{label} {name}, line {line}"

    return _FRAME.sub(frame, text)


def relabel_error(error: BaseException, shell: Any) -> BaseException:
    """Relabel a WorkflowFailed's traceback in place (other errors are left as they are)."""
    text = getattr(error, "traceback", None)
    if isinstance(text, str):
        error.traceback = relabel(text, shell)  # type: ignore[attr-defined]
    return error
