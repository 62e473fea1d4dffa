"""Remote tracebacks that read like local ones.

A function shipped by value (cloudpickle) runs on a worker that has neither its file nor its
source, and cloudpickle 3.1.3 names every such code object ``<dynamic-code>``; the worker's
traceback then says ``File "<dynamic-code>", line 196, in parse`` with no source line. The
kernel holds the original code objects and the cells' source (``linecache``), so the driver maps
each such frame back: the code object of that name whose lines hold that line gives the file,
and ``linecache`` the source line. The notebook face then labels cell files ``Cell In[N]`` as
it does for local failures. This depends neither on what cloudpickle does to ``co_filename``
nor on the worker reading the kernel's files (it may run on another machine).
"""

from __future__ import annotations

import linecache
import re
import sys
import sysconfig
import types
from collections.abc import Iterable
from typing import Any

_FRAME = re.compile(r'^(?P<indent>\s*)File "(?P<file>[^"\n]+)", line (?P<line>\d+), in (?P<name>\S+)$')

Span = tuple[int, int, str]  # first line, last line, file name


class FrameIndex:
    """Where the code of some functions (and everything they reach by value) came from."""

    def __init__(self, functions: Iterable[Any]) -> None:
        self._spans: dict[str, list[Span]] = {}
        self._seen: set[int] = set()
        for fn in functions:
            self._add_object(fn, depth=0)

    def restore(self, text: str) -> str:
        """``text`` (a formatted traceback) with the frames of these functions given their file and source line."""
        if not text or not self._spans:
            return text
        lines = text.splitlines()
        out: list[str] = []
        for index, line in enumerate(lines):
            match = _FRAME.match(line)
            found = self._find(match) if match else None
            if found is None:
                out.append(line)
                continue
            assert match is not None
            indent, number = match.group("indent"), int(match.group("line"))
            out.append(f'{indent}File "{found}", line {number}, in {match.group("name")}')
            following = lines[index + 1] if index + 1 < len(lines) else ""
            has_source = following.startswith(indent + " ") and not _FRAME.match(following)
            source = linecache.getline(found, number).strip()
            if source and not has_source:
                out.append(f"{indent}    {source}")
        return "\n".join(out)

    def _find(self, match: re.Match[str]) -> str | None:
        file, number = match.group("file"), int(match.group("line"))
        spans = self._spans.get(match.group("name"), ())
        holding = {name for first, last, name in spans if first <= number <= last}
        if file != _DYNAMIC and file not in holding:
            return None  # a frame of code the worker has as a file of its own (an installed package)
        if len(holding) != 1:
            return None  # not ours, or ambiguous: leave the frame as the worker wrote it
        return next(iter(holding))

    # -- walking what a function reaches ----------------------------------------------------------

    def _add_object(self, obj: Any, depth: int) -> None:
        if depth > _MAX_DEPTH or id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        target = getattr(obj, "__func__", obj)  # bound methods
        target = getattr(target, "__wrapped__", target)  # decorated functions (functools.wraps)
        if isinstance(target, type):
            for value in vars(target).values():
                self._add_object(getattr(value, "__func__", value), depth + 1)
            return
        code = getattr(target, "__code__", None)
        if not isinstance(code, types.CodeType):
            func = getattr(target, "func", None)  # functools.partial
            if func is not None:
                self._add_object(func, depth + 1)
            return
        self._add_code(code)
        module_globals = getattr(target, "__globals__", {})
        names = _names(code)
        for name in names:
            value = module_globals.get(name)
            if isinstance(value, types.ModuleType) and _own_module(value):  # `helpers.clean(x)`
                for attribute in names:
                    found = getattr(value, attribute, None)
                    if _walkable(found):
                        self._add_object(found, depth + 1)
            elif _walkable(value):
                self._add_object(value, depth + 1)
        for cell in getattr(target, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _walkable(value):
                self._add_object(value, depth + 1)

    def _add_code(self, code: types.CodeType) -> None:
        numbers = [line for _, _, line in code.co_lines() if line is not None]
        first = min([code.co_firstlineno, *numbers])
        self._spans.setdefault(code.co_name, []).append((first, max([first, *numbers]), code.co_filename))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self._add_code(const)


_DYNAMIC = "<dynamic-code>"
_MAX_DEPTH = 8


def _walkable(value: Any) -> bool:
    """Functions and classes of the user's own code (what travels by value); installed packages
    and the standard library keep their files on the worker."""
    if not isinstance(value, (types.FunctionType, types.MethodType, type)):
        return False
    name = getattr(value, "__module__", "") or ""
    if name == "__main__":  # notebook cells (a kernel's __main__ may be its launcher's file)
        return True
    module = sys.modules.get(name)
    return module is not None and _own_module(module)


def _own_module(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and not file.startswith(_INSTALLED)


_INSTALLED = tuple(
    {path for key, path in sysconfig.get_paths().items() if key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names
