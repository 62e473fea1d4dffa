"""Fingerprints of functions and values: how the engine knows that "nothing changed".

A function's fingerprint covers its bytecode, constants, names, defaults and closure values,
and, recursively, the fingerprints of the functions and plain constants of its module globals
that it refers to by name. Comments, whitespace and the cell a function was defined in do not
count; a change to a helper it calls does.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Any

_PLAIN = (int, float, str, bool, bytes, type(None))


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def function_fingerprint(fn: Any) -> str:
    """A stable hash of what a callable would do when called."""
    return sha256(_describe(fn, set()))


def _describe(fn: Any, seen: set[int]) -> str:
    if id(fn) in seen:
        return "<recursive>"
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        return f"partial({_describe(fn.func, seen)},{fn.args!r},{sorted(fn.keywords.items())!r})"
    target = inspect.unwrap(fn) if callable(fn) else fn
    if isinstance(target, types.MethodType):
        return f"method({_describe(target.__func__, seen)})"
    code = getattr(target, "__code__", None)
    if code is None:
        cls = target if isinstance(target, type) else type(target)
        return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    parts = [target.__qualname__, _code(code)]
    defaults = getattr(target, "__defaults__", None) or ()
    parts.append(",".join(_value_token(value, seen) for value in defaults))
    kwdefaults = sorted((getattr(target, "__kwdefaults__", None) or {}).items())
    parts.append(",".join(f"{name}={_value_token(value, seen)}" for name, value in kwdefaults))
    for cell in getattr(target, "__closure__", None) or ():
        try:
            parts.append(_value_token(cell.cell_contents, seen))
        except ValueError:  # empty cell
            parts.append("<empty>")
    module_globals = getattr(target, "__globals__", {})
    for name in _global_names(code):
        if name in module_globals:
            parts.append(f"{name}={_value_token(module_globals[name], seen)}")
    return "\n".join(parts)


def _value_token(value: Any, seen: set[int]) -> str:
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, (types.FunctionType, functools.partial)):
        return _describe(value, seen)
    if isinstance(value, (tuple, frozenset)) and all(isinstance(v, _PLAIN) for v in value):
        return repr(value)
    # Modules, classes and mutable objects: identity by name only (never a repr, which may hold
    # a memory address and so differ between processes).
    return f"<{type(value).__qualname__}>"


def _code(code: types.CodeType) -> str:
    consts = []
    for const in code.co_consts:
        consts.append(_code(const) if isinstance(const, types.CodeType) else repr(const))
    return "|".join(
        (
            code.co_code.hex(),
            ",".join(consts),
            ",".join(code.co_names),
            ",".join(code.co_varnames),
            ",".join(code.co_freevars),
        )
    )


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return sorted(set(names))
