"""Fingerprints of functions and values: how the engine knows that "nothing changed".

A function's fingerprint covers what a call of it reads:

- its bytecode, constants and names (not comments, whitespace or the cell it was defined in);
- its default values and closure values, by content;
- the globals it reads (``LOAD_GLOBAL`` in its bytecode or that of its nested code), by
  content: dicts, lists, sets, NumPy arrays, pandas objects, dataclasses and instances of any
  class, with the code of the classes defined in the notebook (or in local modules) that they are
  instances of; functions it reaches are fingerprinted in turn, so an edited helper counts;
- of a module it reads, the attributes it reads of it (``helpers.f``, ``config.SCALE``), so a
  local module edited on disk and reloaded counts.

Names a function assigns itself (``global calls; calls += 1``, ``nonlocal`` targets) are state
it owns, not inputs: they do not make it look changed after it runs.

Content is hashed with xxHash (XXH3-128) over a pickle (protocol 5) whose large buffers (NumPy
arrays, the blocks of a DataFrame) are hashed in place, never copied. A :class:`Fingerprinter`
is one pass (one run): each object is hashed at most once by id, each function described once.

A value that cannot be pickled (a lock, a connection, an open file, a generator) cannot be seen
into: the function that reads it gets a fingerprint of its own for this pass, so its calls are
never reused (and never serve a later run), and :attr:`FunctionPrint.unhashable` names the global.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import inspect
import io
import os
import pickle
import sys
import sysconfig
import threading
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

_ATOMIC = (int, float, str, bool, bytes, type(None), complex)
_BIG = 1 << 16  # buffers and arrays above this size are hashed once per pass, by id
_LONG = 1000  # so are containers above this length (and they may take the fast path of _plain_pickle)
_ATOMIC_TYPES = frozenset(_ATOMIC)
_SKIPPED_CLASS_ATTRS = frozenset(
    (
        "__dict__",
        "__weakref__",
        "__module__",
        "__doc__",
        "__qualname__",
        "__annotations__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__firstlineno__",
        "__static_attributes__",
    )
)
# What a metaclass derives from the class body (ABC's registry, pydantic's schemas and fields, built
# from the annotations and defaults that are hashed): new objects each time a class is made.
_DERIVED_CLASS_PREFIXES = ("_abc_", "__pydantic_", "__abstractmethods__", "__signature__")
# Synchronization objects coordinate calls; they hold no data a result is computed from, so they
# count by their type (a lock shared by a function's calls does not make them run again).
_SYNC_TYPES = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Event,
    threading.Condition,
    threading.Semaphore,
    threading.Barrier,
)
FINGERPRINT_ATTRIBUTE = "__durable_fingerprint__"
"""A callable may carry its own fingerprint (a string) under this name; it is used as it is."""
IGNORED_ATTRIBUTE = "__durable_not_inputs__"


def not_inputs(*names: str) -> Any:
    """Decorator: the globals (or closure variables) ``names`` are not inputs of the function.

    They count by their type only, so calls stay reusable although their content cannot be hashed
    (a client, a connection) or changes without changing results (a logger, a progress bar)::

        @not_inputs("client")
        def ask(question):
            return client.complete(question)
    """
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"not_inputs() takes the names of globals or closure variables, not {name!r}")

    def mark(fn: Any) -> Any:
        setattr(fn, IGNORED_ATTRIBUTE, frozenset(names) | getattr(fn, IGNORED_ATTRIBUTE, frozenset()))
        return fn

    return mark


_DESCRIBERS: dict[type, Callable[[Any, Fingerprinter], str]] = {}


def register_fingerprint(cls: type, describe: Callable[[Any, Fingerprinter], str]) -> None:
    """Fingerprint instances of ``cls`` (and its subclasses) by ``describe(value, fingerprinter)``: a
    string of what defines such a value, for objects pickling cannot read (an agent holding context
    variables and clients). ``fingerprinter.value()`` and ``.function()`` hash what it holds."""
    _DESCRIBERS[cls] = describe


def _describer(cls: type) -> Callable[[Any, Fingerprinter], str] | None:
    for base in cls.__mro__:
        found = _DESCRIBERS.get(base)
        if found is not None:
            return found
    return None


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


class Unhashable(Exception):
    """A value the fingerprint cannot see into (it cannot be pickled)."""

    def __init__(self, type_name: str, reason: str) -> None:
        super().__init__(f"{type_name}: {reason}")
        self.type_name = type_name
        self.reason = reason


@dataclass
class FunctionPrint:
    """A function's fingerprint and what it is made of.

    ``parts``: component -> digest, flattened through the functions it reaches
    (``code``, ``defaults``, ``closure:x``, ``global:CONFIG``, ``global:helper/code`` ...);
    ``unhashable``: component -> type name of each value that could not be hashed.
    """

    digest: str
    parts: dict[str, str] = field(default_factory=dict)
    unhashable: dict[str, str] = field(default_factory=dict)


def function_fingerprint(fn: Any) -> str:
    """A stable hash of what a callable would do when called (a pass of its own)."""
    return Fingerprinter().function(fn).digest


def _library_roots() -> tuple[str, ...]:
    roots = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            roots.add(os.path.realpath(path) + os.sep)
    for path in sys.path:
        if "site-packages" in path or "dist-packages" in path:
            roots.add(os.path.realpath(path) + os.sep)
    return tuple(sorted(roots))


_LIBRARY_ROOTS = _library_roots()
_OWN_PACKAGE = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep


def _module_is_local(module_name: str | None) -> bool:
    """Code of the notebook (``__main__``) or of a module outside the installed libraries (and
    outside this package, whose functions carry their own fingerprints where it matters)."""
    if not module_name or module_name == "__main__":
        return True
    module = sys.modules.get(module_name)
    if module is None:
        return True  # code exec'd under a module name nobody imported
    path = getattr(module, "__file__", None)
    return _path_is_local(path) if path else module_name not in sys.builtin_module_names


@functools.lru_cache(maxsize=4096)
def _path_is_local(path: str) -> bool:
    real = os.path.realpath(path)
    return not real.startswith(_LIBRARY_ROOTS) and not real.startswith(_OWN_PACKAGE)


def is_local(obj: Any) -> bool:
    return _module_is_local(getattr(obj, "__module__", None))


def is_local_module(module: types.ModuleType) -> bool:
    return _module_is_local(module.__name__)


class _HashPickler(pickle.Pickler):
    """Pickles a value for hashing: sets in a canonical order, functions and classes as their
    fingerprints, large arrays as their (cached) digests; buffers go to the hash, not the stream."""

    def __init__(self, out: io.BytesIO, owner: Fingerprinter, root: Any, buffers: list[Any]) -> None:
        super().__init__(out, protocol=5, buffer_callback=buffers.append)
        self._owner = owner
        self._root = root

    def persistent_id(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _ATOMIC or obj is self._root:
            return None
        owner = self._owner
        if cls is list or cls is dict or cls is tuple:
            return ("plain", owner.value(obj)) if len(obj) > _LONG else None
        if cls is set or cls is frozenset:
            return ("set", sorted(owner.value(item) for item in obj))
        if isinstance(obj, _SYNC_TYPES):
            return ("sync", _type_name(obj))
        if isinstance(obj, (types.FunctionType, functools.partial, types.MethodType)):
            return ("fn", owner.function(obj).digest)
        if isinstance(obj, type):
            return ("class", owner.class_token(obj))
        if isinstance(obj, types.ModuleType):
            return ("module", obj.__name__)
        if isinstance(obj, (types.BuiltinFunctionType, types.GeneratorType, types.CoroutineType)):
            if isinstance(obj, types.BuiltinFunctionType):
                return ("builtin", getattr(obj, "__module__", None), obj.__qualname__)
            raise Unhashable(_type_name(obj), "a generator or coroutine has state that cannot be read")
        if cls.__module__ == "numpy" and cls.__name__ == "ndarray" and obj.nbytes > _BIG:
            return ("array", owner.value(obj))
        describe = _describer(cls) if _DESCRIBERS else None
        if describe is not None:
            return ("described", _type_name(obj), describe(obj, owner))
        return None


class Fingerprinter:
    """One fingerprinting pass: objects hashed once by id, functions and classes described once."""

    def __init__(self) -> None:
        self._values: dict[int, tuple[Any, str]] = {}
        self._functions: dict[int, tuple[Any, FunctionPrint]] = {}
        self._classes: dict[int, tuple[Any, str]] = {}
        self._stack: list[int] = []  # ids of the functions and classes being described
        self._nonce = uuid.uuid4().hex  # what an unhashable value contributes: unique to this pass

    # -- values -------------------------------------------------------------------------------

    def value(self, value: Any) -> str:
        """A digest of a value's content (raises Unhashable)."""
        cls = type(value)
        if cls is str:
            return _digest(b"str:" + value.encode("utf-8", "surrogatepass"))
        if cls is bytes:
            return _digest(b"bytes:" + value)
        if cls in _ATOMIC:
            return _digest(repr(value).encode() + cls.__name__.encode())
        found = self._values.get(id(value))
        if found is not None and found[0] is value:
            return found[1]
        digest = self._pickle_digest(value)
        self._values[id(value)] = (value, digest)
        return digest

    def _pickle_digest(self, value: Any) -> str:
        describe = _describer(type(value)) if _DESCRIBERS else None
        if describe is not None:
            return _digest(f"described:{_type_name(value)}:{describe(value, self)}".encode())
        if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
            return self.function(value).digest
        if isinstance(value, type):
            return _digest(self.class_token(value).encode())
        if isinstance(value, types.ModuleType):
            return _digest(f"module:{value.__name__}".encode())
        if isinstance(value, _SYNC_TYPES):
            return _digest(f"sync:{_type_name(value)}".encode())
        if type(value) in (set, frozenset):  # in a canonical order: iteration order follows the hash seed
            return _digest(",".join([type(value).__name__, *sorted(self.value(item) for item in value)]).encode())
        plain = _plain_pickle(value)
        if plain is not None:
            return _digest(plain)
        out = io.BytesIO()
        buffers: list[Any] = []
        try:
            _HashPickler(out, self, value, buffers).dump(value)
        except Unhashable:
            raise
        except RecursionError:
            raise Unhashable(_type_name(value), "nested too deeply") from None
        except Exception as exc:
            raise Unhashable(_type_name(value), f"{type(exc).__name__}: {exc}") from None
        hasher = xxhash.xxh3_128(out.getbuffer())
        for buffer in buffers:
            view = buffer.raw()
            hasher.update(len(view).to_bytes(8, "little"))
            hasher.update(view)
        return hasher.hexdigest()

    # -- classes -------------------------------------------------------------------------------

    def class_token(self, cls: type) -> str:
        """A class by name; a class of the notebook or a local module also by its code."""
        name = f"{cls.__module__}.{cls.__qualname__}"
        if not is_local(cls):
            return name
        found = self._classes.get(id(cls))
        if found is not None and found[0] is cls:
            return found[1]
        if id(cls) in self._stack:
            return f"<recursive {name}>"
        self._stack.append(id(cls))
        try:
            parts = [name, ",".join(self.class_token(base) for base in cls.__bases__)]
            for attr, member in sorted(vars(cls).items()):
                if attr in _SKIPPED_CLASS_ATTRS or attr.startswith(_DERIVED_CLASS_PREFIXES):
                    continue
                parts.append(f"{attr}={self._member(member)}")
            fields = getattr(cls, "__pydantic_fields__", None)  # a pydantic model's fields, by their types and defaults
            if isinstance(fields, dict):
                for field_name, info in sorted(fields.items()):
                    parts.append(f"field:{field_name}={info.annotation!s}={info.default!r}")
        finally:
            self._stack.pop()
        token = f"{name}:{_digest(chr(0).join(parts).encode())}"
        self._classes[id(cls)] = (cls, token)
        return token

    def _member(self, member: Any) -> str:
        if isinstance(member, (staticmethod, classmethod)):
            return f"{type(member).__name__}({self._member(member.__func__)})"
        if isinstance(member, property):
            return "property(" + ",".join(self._member(f) if f else "-" for f in (member.fget, member.fset)) + ")"
        if isinstance(member, functools.cached_property):
            return f"cached_property({self._member(member.func)})"
        try:
            return self.value(member)
        except Unhashable as exc:
            return f"<unhashable {exc.type_name} {self._nonce}>"

    # -- functions -----------------------------------------------------------------------------

    def function(self, fn: Any) -> FunctionPrint:
        found = self._functions.get(id(fn))
        if found is not None and found[0] is fn:
            return found[1]
        if id(fn) in self._stack:
            return FunctionPrint(_digest(f"<recursive {getattr(fn, '__qualname__', '?')}>".encode()))
        self._stack.append(id(fn))
        try:
            printed = self._describe(fn)
        except RecursionError:
            printed = self._opaque(fn, "nested too deeply")
        except Exception as exc:  # an object that breaks introspection: never "unchanged"
            printed = self._opaque(fn, f"{type(exc).__name__}: {exc}")
        finally:
            self._stack.pop()
        # A function described while a caller was on the stack may have met that caller as
        # "<recursive>": that description holds only from there, so only top-level ones are kept
        # (the values they read are cached by id either way).
        if not self._stack:
            self._functions[id(fn)] = (fn, printed)
        return printed

    def _opaque(self, fn: Any, reason: str) -> FunctionPrint:
        """What a callable that cannot be described contributes: a fingerprint of this pass only."""
        return FunctionPrint(
            sha256(f"<opaque {self._nonce}>"),
            {"code": f"<unhashable {self._nonce}>"},
            {"code": f"{_type_name(fn)} ({reason})"},
        )

    def _describe(self, fn: Any) -> FunctionPrint:
        own = getattr(fn, FINGERPRINT_ATTRIBUTE, None)
        if isinstance(own, str):
            return FunctionPrint(_digest(own.encode()), {"declared": own})
        if isinstance(fn, functools.partial):
            inner = self.function(fn.func)
            parts = {f"func/{k}": v for k, v in inner.parts.items()}
            unhashable = {f"func/{k}": v for k, v in inner.unhashable.items()}
            for i, arg in enumerate(fn.args):
                self._add(parts, unhashable, f"arg:{i}", arg)
            for name, arg in sorted(fn.keywords.items()):
                self._add(parts, unhashable, f"arg:{name}", arg)
            return self._finish("partial", inner.digest, parts, unhashable)
        target = inspect.unwrap(fn) if callable(fn) else fn
        if isinstance(target, types.MethodType):
            inner = self.function(target.__func__)
            parts = {f"func/{k}": v for k, v in inner.parts.items()}
            unhashable = {f"func/{k}": v for k, v in inner.unhashable.items()}
            self._add(parts, unhashable, "self", target.__self__)
            return self._finish("method", inner.digest, parts, unhashable)
        if isinstance(target, type):
            return FunctionPrint(_digest(self.class_token(target).encode()), {"class": self.class_token(target)})
        code = getattr(target, "__code__", None)
        if code is None or not is_local(target):
            name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"
            return FunctionPrint(_digest(name.encode()), {"name": name})
        reads = code_reads(code)
        ignored = getattr(fn, IGNORED_ATTRIBUTE, None) or getattr(target, IGNORED_ATTRIBUTE, frozenset())
        parts: dict[str, str] = {"code": _digest(f"{target.__qualname__}\0{_code(code)}".encode())}
        unhashable: dict[str, str] = {}
        for i, value in enumerate(getattr(target, "__defaults__", None) or ()):
            self._add(parts, unhashable, f"default:{i}", value)
        for name, value in sorted((getattr(target, "__kwdefaults__", None) or {}).items()):
            self._add(parts, unhashable, f"default:{name}", value)
        for name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or (), strict=False):
            if name in reads.owned_cells:
                continue  # a nonlocal it assigns: its own state
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                parts[f"closure:{name}"] = "<empty>"
                continue
            if name in reads.written and _is_data(value):
                continue  # a container it fills (results.append, counts[k] += 1): its own state
            if name in ignored:
                parts[f"closure:{name}"] = f"not an input: {_type_name(value)}"
                continue
            self._add(parts, unhashable, f"closure:{name}", value)
        module_globals = getattr(target, "__globals__", {})
        builtins_ns = module_globals.get("__builtins__", {})
        for name in sorted(reads.globals - reads.owned_globals):
            if name in module_globals:
                value = module_globals[name]
            elif name in (builtins_ns if isinstance(builtins_ns, dict) else vars(builtins_ns)):
                continue  # a builtin
            else:
                parts[f"global:{name}"] = "<undefined>"
                continue
            if name in reads.written and _is_data(value):
                continue  # a container it fills (results.append, counts[k] += 1): its own state
            if name in ignored:
                parts[f"global:{name}"] = f"not an input: {_type_name(value)}"
                continue
            if isinstance(value, types.ModuleType):
                parts[f"global:{name}"] = f"module {value.__name__}"
                if is_local_module(value):  # a library module counts by its name
                    for path in sorted(reads.paths.get(name, ())):
                        self._add_path(parts, unhashable, name, value, path)
                continue
            try:
                self._add(parts, unhashable, f"global:{name}", value, strict=True)
            except Unhashable as exc:
                paths = reads.paths.get(name)
                if not paths:
                    unhashable[f"global:{name}"] = f"{exc.type_name} ({exc.reason})"
                    parts[f"global:{name}"] = f"<unhashable {self._nonce}>"
                    continue
                for path in sorted(paths):  # what it reads of the value (CONFIG.scale) may be hashable
                    self._add_path(parts, unhashable, name, value, path)
        return self._finish(target.__qualname__, "", parts, unhashable)

    def _add_path(
        self, parts: dict[str, str], unhashable: dict[str, str], name: str, value: Any, path: tuple[str, ...]
    ) -> None:
        where = name
        for attr in path:
            where = f"{where}.{attr}"
            try:
                value = getattr(value, attr)
            except Exception:
                parts[f"global:{where}"] = "<missing>"
                return
            if not isinstance(value, types.ModuleType) or not is_local_module(value):
                break
        self._add(parts, unhashable, f"global:{where}", value)

    def _add(
        self, parts: dict[str, str], unhashable: dict[str, str], label: str, value: Any, strict: bool = False
    ) -> None:
        if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)) or (
            isinstance(value, type) and is_local(value)
        ):
            inner = self.function(value)
            parts[label] = inner.digest
            for k, v in inner.parts.items():
                parts[f"{label}/{k}"] = v
            for k, v in inner.unhashable.items():
                unhashable[f"{label}/{k}"] = v
            return
        if isinstance(value, types.BuiltinFunctionType):
            bound = value.__self__
            if bound is None or isinstance(bound, types.ModuleType):  # C code of a module: by name
                parts[label] = f"builtin {getattr(value, '__module__', None)}.{value.__qualname__}"
                return
            value = bound  # a method of an object (log.write): what it does depends on the object
        try:
            parts[label] = self.value(value)
        except Unhashable as exc:
            if strict:
                raise
            unhashable[label] = f"{exc.type_name} ({exc.reason})"
            parts[label] = f"<unhashable {self._nonce}>"

    @staticmethod
    def _finish(kind: str, inner: str, parts: dict[str, str], unhashable: dict[str, str]) -> FunctionPrint:
        text = "\n".join([kind, inner, *(f"{k}={v}" for k, v in sorted(parts.items()) if "/" not in k)])
        return FunctionPrint(sha256(text), parts, unhashable)


@dataclass
class Reads:
    globals: set[str] = field(default_factory=set)
    owned_globals: set[str] = field(default_factory=set)
    owned_cells: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)  # globals and closure variables changed in place
    paths: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)  # global -> attribute paths read


_READS: dict[types.CodeType, Reads] = {}
_ATTR_OPS = frozenset(("LOAD_ATTR", "LOAD_METHOD"))


def code_reads(code: types.CodeType) -> Reads:
    """The globals a code object (and its nested code) reads and assigns, from its bytecode."""
    found = _READS.get(code)
    if found is not None:
        return found
    reads = Reads()
    _scan(code, reads, frozenset(code.co_freevars))
    if len(_READS) > 20_000:
        _READS.clear()
    _READS[code] = reads
    return reads


def _scan(code: types.CodeType, reads: Reads, cells: frozenset[str]) -> None:
    current: str | None = None
    path: list[str] = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _ATTR_OPS and current is not None:
            path.append(ins.argval)
            continue
        if current is not None and path:
            reads.paths.setdefault(current, set()).add(tuple(path))
        current, path = None, []
        if op in ("LOAD_GLOBAL", "LOAD_NAME"):
            reads.globals.add(ins.argval)
            current = ins.argval
        elif op in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            reads.owned_globals.add(ins.argval)
        elif op in ("STORE_DEREF", "DELETE_DEREF") and ins.argval in cells:
            reads.owned_cells.add(ins.argval)
    if current is not None and path:
        reads.paths.setdefault(current, set()).add(tuple(path))
    if sys.version_info[:2] == (3, 11):  # the stack effects of _EFFECTS are those of 3.11
        reads.written.update(name for name, kind in _written_into(code) if kind == "global" or name in cells)
    reads.written.update(name for name, paths in reads.paths.items() if any(p[0] in _MUTATORS for p in paths))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _scan(const, reads, cells)


# Methods that change the container they are called on.
_MUTATORS = frozenset(
    (
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "add",
        "update",
        "setdefault",
        "pop",
        "popitem",
        "popleft",
        "remove",
        "discard",
        "clear",
        "__setitem__",
        "__delitem__",
    )
)
# (pops, pushes) of the instructions followed through a basic block; any other one forgets the stack.
_EFFECTS: dict[str, Any] = {
    "LOAD_FAST": (0, 1),
    "LOAD_CONST": (0, 1),
    "LOAD_CLOSURE": (0, 1),
    "PUSH_NULL": (0, 1),
    "LOAD_ATTR": (1, 1),
    "BINARY_SUBSCR": (2, 1),
    "BINARY_OP": (2, 1),
    "UNARY_NEGATIVE": (1, 1),
    "UNARY_NOT": (1, 1),
    "UNARY_INVERT": (1, 1),
    "BUILD_TUPLE": lambda arg: (arg, 1),
    "BUILD_LIST": lambda arg: (arg, 1),
    "PRECALL": (0, 0),
    "KW_NAMES": (0, 0),
    "CALL": lambda arg: (arg + 2, 1),
    "POP_TOP": (1, 0),
    "STORE_FAST": (1, 0),
    "NOP": (0, 0),
    "RESUME": (0, 0),
    "CACHE": (0, 0),
}


def _written_into(code: types.CodeType) -> list[tuple[str, str]]:
    """(name, "global" | "cell") of globals and closure variables the code changes in place:
    ``results.append(x)``, ``cache[k] = v``, ``counts[k] += 1``, ``del d[k]``, ``state.n += 1``.

    A small symbolic stack follows each basic block; what it cannot follow it forgets, so a
    write it does not recognise leaves the value an input (never the other way round).
    """
    written: list[tuple[str, str]] = []
    targets = set(dis.findlabels(code.co_code))
    stack: list[tuple[str, str] | None] = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        if ins.offset in targets:
            stack = []
        if op == "LOAD_GLOBAL" or op == "LOAD_NAME":
            if op == "LOAD_GLOBAL" and sys.version_info >= (3, 11) and ins.arg is not None and ins.arg & 1:
                stack.append(None)  # the NULL of a call
            stack.append((ins.argval, "global"))
        elif op == "LOAD_DEREF" or op == "LOAD_CLASSDEREF":
            stack.append((ins.argval, "cell"))
        elif op == "LOAD_METHOD":
            top = stack.pop() if stack else None
            if top is not None and ins.argval in _MUTATORS:
                written.append(top)
            stack += [None, None]
        elif op == "STORE_SUBSCR" or op == "DELETE_SUBSCR":
            target = stack[-2] if len(stack) >= 2 else None
            if target is not None:
                written.append(target)
            del stack[-(3 if op == "STORE_SUBSCR" else 2) :]
        elif op == "STORE_ATTR":
            if stack and stack[-1] is not None:
                written.append(stack[-1])  # type: ignore[arg-type]
            del stack[-2:]
        elif op == "COPY":
            stack.append(stack[-ins.arg] if len(stack) >= ins.arg else None)
        elif op == "SWAP":
            if len(stack) >= ins.arg:
                stack[-1], stack[-ins.arg] = stack[-ins.arg], stack[-1]
            else:
                stack = []
        elif op in _EFFECTS:
            effect = _EFFECTS[op]
            pops, pushes = effect(ins.arg) if callable(effect) else effect
            if pops:
                del stack[-pops:]
            stack += [None] * pushes
        else:
            stack = []
    return written


def _code(code: types.CodeType) -> str:
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts.append(_code(const))
        elif isinstance(const, frozenset):  # `x in {"a", "b"}`: its order depends on the hash seed
            consts.append("frozenset(" + ",".join(sorted(map(repr, const))) + ")")
        else:
            consts.append(repr(const))
    return "|".join(
        (
            code.co_code.hex(),
            ",".join(consts),
            ",".join(code.co_names),
            ",".join(code.co_varnames),
            ",".join(code.co_freevars),
        )
    )


def _plain_pickle(value: Any) -> bytes | None:
    """The plain (C) pickle of a list, tuple or dict of atoms, or of a NumPy object array of atoms:
    nothing in it needs the hashing pickler (no set, function, class or object), so each element
    does not cost a Python call. None for anything else."""
    cls = type(value)
    if cls is list or cls is tuple:
        if len(value) < _LONG:
            return None
        kinds = set(map(type, value))
    elif cls is dict:
        if len(value) < _LONG:
            return None
        kinds = set(map(type, value)) | set(map(type, value.values()))
    elif cls.__module__ == "numpy" and cls.__name__ == "ndarray" and value.dtype.hasobject:
        if value.dtype.fields is not None or value.size < _LONG:
            return None
        kinds = set(map(type, value.ravel(order="K")))
    else:
        return None
    if not kinds <= _ATOMIC_TYPES:
        return None
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5)
    pickler.fast = True  # no memo: atoms cannot form cycles, and memoizing a million strings costs 8x
    pickler.dump(value)
    return out.getvalue()


def _is_data(value: Any) -> bool:
    """Not code: a module, class or function is never state a function owns."""
    return not isinstance(value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType))


def _digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
