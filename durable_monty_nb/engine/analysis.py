"""Static analysis of workflow code, done once before anything runs.

- Syntax errors are reported with the line of the workflow code.
- Every call is classified as *awaited* (answered with a future, run concurrently) or
  *synchronous* (``y = f(x)``, answered with a value). Monty's snapshot does not say which;
  its ``position`` (UTF-8 byte offsets into the fed source) is matched against the calls found
  here. A call is awaited when it is the operand of ``await``, an argument of ``gather(...)``
  (also through ``*[...]``, lists and comprehensions), or builds a name that is later gathered
  or awaited (``tasks = [f(x) for x in xs]; await gather(*tasks)``, ``tasks.append(f(x))``).
- Free names (read but never bound in the code, and not builtins) must come from the
  namespace; top-level assigned names are exported after completion.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
from dataclasses import dataclass, field

from ..errors import WorkflowCodeError

# Python builtins that Monty 1.4 does not provide (measured by reading each name in a sandbox).
MONTY_MISSING_BUILTINS = frozenset(
    (
        "BaseExceptionGroup",
        "BlockingIOError",
        "BrokenPipeError",
        "BufferError",
        "BytesWarning",
        "ChildProcessError",
        "ConnectionAbortedError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "DeprecationWarning",
        "EOFError",
        "EncodingWarning",
        "EnvironmentError",
        "ExceptionGroup",
        "FloatingPointError",
        "FutureWarning",
        "GeneratorExit",
        "IOError",
        "ImportWarning",
        "IndentationError",
        "InterruptedError",
        "PendingDeprecationWarning",
        "ProcessLookupError",
        "ReferenceError",
        "ResourceWarning",
        "RuntimeWarning",
        "StopAsyncIteration",
        "SyntaxWarning",
        "SystemError",
        "TabError",
        "UnicodeError",
        "UnicodeTranslateError",
        "UnicodeWarning",
        "UserWarning",
        "Warning",
        "aiter",
        "anext",
        "ascii",
        "breakpoint",
        "bytearray",
        "callable",
        "classmethod",
        "compile",
        "copyright",
        "credits",
        "delattr",
        "dir",
        "exit",
        "globals",
        "help",
        "input",
        "issubclass",
        "license",
        "memoryview",
        "quit",
        "staticmethod",
        "super",
        "vars",
    )
)
# Names the sandbox provides without the namespace.
SANDBOX_NAMES = (frozenset(dir(builtins)) - MONTY_MISSING_BUILTINS) | {"gather", "signal"}


def sandbox_substitute(name: str) -> str | None:
    """For an exception class Monty lacks, the nearest base class it has."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        for base in cls.__mro__[1:]:
            if base.__name__ in SANDBOX_NAMES:
                return base.__name__
    return None


_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
    ast.ClassDef,
)


@dataclass
class CodeInfo:
    code: str
    code_hash: str
    awaited_spans: set[tuple[int, int]] = field(default_factory=set)
    awaited_starts: set[int] = field(default_factory=set)
    free_names: dict[str, int] = field(default_factory=dict)
    exports: list[str] = field(default_factory=list)
    # How many calls the code makes, as far as the code says (see _count_sites): the start
    # offsets of call sites that run at most once, and whether any call runs an unknown number
    # of times (in a loop, a helper, or a comprehension that is not gathered).
    single_sites: frozenset[int] = frozenset()
    open_total: bool = False
    # The source Monty is fed: ``code`` with gathered comprehensions of notebook calls turned
    # into one host call each (see rewrite_gathers); same lines as ``code``.
    fed: str = ""
    batched: int = 0  # how many gathers were rewritten
    batching: int | None = None  # the version of the rewrite (analysis.BATCHING), None: none

    def is_awaited(self, start: int, end: int) -> bool | None:
        """True/False for a known call span, None when the span is unknown."""
        if (start, end) in self.awaited_spans:
            return True
        if start in self.awaited_starts:
            return True
        return False if (start, end) in self._all_spans else None

    _all_spans: set[tuple[int, int]] = field(default_factory=set)


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


BATCHING = 1
"""The version of :func:`rewrite_gathers` (stored with each execution: its checkpoints run that code)."""


def analyze(code: str, *, batching: int | None = BATCHING) -> CodeInfo:
    """The analysis of ``code``; with ``batching`` (a version of :func:`rewrite_gathers`, None for
    none) Monty is fed the rewritten code (``CodeInfo.fed``)."""
    try:
        tree = ast.parse(code, filename="<durable cell>")
    except SyntaxError as exc:
        line = exc.lineno or 0
        text = (exc.text or "").rstrip("\n")
        pointer = f"\n    {text}" if text else ""
        raise WorkflowCodeError(
            f"syntax error at line {line} of the workflow code: {exc.msg}{pointer}", line=line
        ) from None
    _check_supported(tree)
    info = CodeInfo(code=code, code_hash=code_hash(code), fed=code)
    _find_names(tree, info)  # names and exports: of the user's code
    info.batching = batching
    fed, info.batched = rewrite_gathers(code, tree, info.free_names) if batching == BATCHING else (code, 0)
    if info.batched:  # call spans (positions Monty reports): of the code Monty runs
        info.fed = fed
        tree = ast.parse(fed, filename="<durable cell>")
    offsets = _line_offsets(info.fed)
    _classify_calls(tree, info, offsets)
    _count_sites(tree, info, offsets)
    return info


GATHER_FUNCTION = "__dm_gather__"
"""The host call a rewritten gather makes: ``__dm_gather__(name, [(args, kwargs), ...])``."""

# Calls the parts of a batched comprehension may make besides its element: sandbox builtins
# that never reach the host (and methods of sandbox values).
_PURE_BUILTINS = frozenset(
    (
        "abs",
        "all",
        "any",
        "bool",
        "dict",
        "divmod",
        "enumerate",
        "float",
        "frozenset",
        "int",
        "isinstance",
        "len",
        "list",
        "max",
        "min",
        "range",
        "repr",
        "reversed",
        "round",
        "set",
        "sorted",
        "str",
        "sum",
        "tuple",
        "zip",
    )
)


def rewrite_gathers(code: str, tree: ast.Module, free_names: dict[str, int]) -> tuple[str, int]:
    """``await gather(*[f(a, k=b) for x in xs if c])`` as ``await __dm_gather__('f', [((a,),
    {'k': b}) for x in xs if c])``: Monty builds the argument tuples itself and the host gets
    the whole fan-out in one call (one round trip instead of one per call).

    Only where nothing can tell the difference: ``f`` is a notebook function (a free name the
    code never binds), the arguments and the comprehension's clauses call nothing that reaches
    the host, and the gather is awaited as it is built. Each span is replaced on its own lines
    (padded with newlines inside the parentheses), so every line keeps its number. Returns the
    new source and how many gathers were rewritten.
    """
    bound = _bound_anywhere(tree)
    lines = code.splitlines(keepends=True)
    edits: list[tuple[ast.Call, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Await) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if not _is_plain_gather(call, bound) or len(call.args) != 1 or call.keywords:
            continue
        star = call.args[0]
        if not (isinstance(star, ast.Starred) and isinstance(star.value, (ast.ListComp, ast.GeneratorExp))):
            continue
        comp = star.value
        elt = comp.elt
        if not (
            isinstance(elt, ast.Call)
            and isinstance(elt.func, ast.Name)
            and elt.func.id in free_names
            and elt.func.id not in bound
            and all(not isinstance(a, ast.Starred) for a in elt.args)
            and all(k.arg is not None for k in elt.keywords)
            and all(_calls_nothing(a, free_names) for a in [*elt.args, *(k.value for k in elt.keywords)])
            and all(_calls_nothing(part, free_names, pure=True) for part in comp.generators)
        ):
            continue
        edits.append((call, _batched_text(code, lines, call, comp, elt)))
    if not edits:
        return code, 0
    data = code.encode()
    offsets = _line_offsets(code)
    for call, text in sorted(edits, key=lambda e: _span(e[0], offsets), reverse=True):
        start, end = _span(call, offsets)
        data = data[:start] + text.encode() + data[end:]
    return data.decode(), len(edits)


def _batched_text(code: str, lines: list[str], call: ast.Call, comp: ast.expr, elt: ast.Call) -> str:
    def src(node: ast.AST) -> str:
        return ast.get_source_segment(code, node) or ""

    args = "".join(f"{src(a)}, " for a in elt.args)
    kwargs = ", ".join(f"{k.arg!r}: {src(k.value)}" for k in elt.keywords)
    clauses = " ".join(
        f"for ({src(g.target)}) in ({src(g.iter)})" + "".join(f" if ({src(c)})" for c in g.ifs)
        for g in comp.generators  # type: ignore[attr-defined]
    )
    text = f"{GATHER_FUNCTION}({elt.func.id!r}, [(({args}), {{{kwargs}}}) {clauses}])"  # type: ignore[attr-defined]
    missing = (call.end_lineno or call.lineno) - call.lineno - text.count("\n")
    if missing > 0:  # keep the lines that follow where they were
        text = text[:-1] + "\n" * missing + ")"
    return text


def _is_plain_gather(call: ast.Call, bound: set[str]) -> bool:
    fn = call.func
    if isinstance(fn, ast.Name):
        return fn.id == "gather" and "gather" not in bound
    return (
        isinstance(fn, ast.Attribute)
        and fn.attr == "gather"
        and isinstance(fn.value, ast.Name)
        and fn.value.id == "asyncio"
        and "asyncio" not in bound
    )


def _calls_nothing(node: ast.AST, free_names: dict[str, int], *, pure: bool = False) -> bool:
    """True when evaluating ``node`` reaches nothing outside the sandbox (with ``pure``, calls
    of builtins and methods of local values are allowed)."""
    for inner in ast.walk(node):
        if isinstance(inner, (ast.Await, ast.Lambda, ast.NamedExpr, ast.Yield, ast.YieldFrom)):
            return False
        if isinstance(inner, ast.Call):
            if not pure:
                return False
            fn = inner.func
            if isinstance(fn, ast.Name):
                if fn.id not in _PURE_BUILTINS or fn.id in free_names:
                    return False
            elif isinstance(fn, ast.Attribute):
                root = fn.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if not isinstance(root, ast.Name) or root.id == "asyncio":  # a method of a value
                    return False
            else:
                return False
    return True


def _bound_anywhere(tree: ast.Module) -> set[str]:
    """Every name the code binds, in any scope (a conservative view of "rebound")."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            from_asyncio = isinstance(node, ast.ImportFrom) and node.module == "asyncio"
            names.update(
                (a.asname or a.name).split(".")[0]
                for a in node.names
                if not (from_asyncio and a.name == "gather" and a.asname in (None, "gather"))
                and not (isinstance(node, ast.Import) and a.name == "asyncio" and a.asname is None)
            )
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


# Syntax Monty's parser refuses (measured on pydantic-monty 1.4), checked here so that it is
# reported as such before anything else (an unknown name on the same line, for instance).
_UNSUPPORTED_NODES: dict[type, str] = {
    ast.AsyncWith: "'async with' (asynchronous context managers)",
    ast.AsyncFor: "'async for' loops",
    ast.Yield: "'yield' (generators)",
    ast.YieldFrom: "'yield from' (generators)",
    ast.Delete: "the 'del' statement",
}
if hasattr(ast, "TryStar"):
    _UNSUPPORTED_NODES[ast.TryStar] = "'except*' (exception groups)"
if hasattr(ast, "TypeAlias"):
    _UNSUPPORTED_NODES[ast.TypeAlias] = "type aliases ('type X = ...')"


def _check_supported(tree: ast.Module) -> None:
    """Raise WorkflowCodeError for the first syntax the sandbox does not support, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        feature = _UNSUPPORTED_NODES.get(type(node))
        if isinstance(node, ast.ClassDef):
            if node.bases or node.keywords:
                feature = "class inheritance and metaclasses"
            decorated = [
                item.decorator_list[0].lineno
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.decorator_list
            ]
            if decorated:
                found.append((decorated[0], "method decorators (classmethod/staticmethod/property)"))
        elif isinstance(node, ast.comprehension) and node.is_async:
            found.append((node.iter.lineno, "async comprehensions ('async for' in a comprehension)"))
        if feature is not None:
            found.append((getattr(node, "lineno", 0), feature))
    if found:
        line, feature = min(found)
        raise WorkflowCodeError(
            f"unsupported in workflow code: {feature}, at line {line}. The Monty sandbox that runs "
            f"workflow code does not have it; do this inside a notebook function and call that function "
            f"from the workflow.",
            line=line,
        )


def _line_offsets(code: str) -> list[int]:
    offsets, total = [0], 0
    for line in code.encode().splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def _span(node: ast.expr, offsets: list[int]) -> tuple[int, int]:
    start = offsets[node.lineno - 1] + node.col_offset
    end = offsets[(node.end_lineno or node.lineno) - 1] + (node.end_col_offset or 0)
    return start, end


def _is_gather(call: ast.Call) -> bool:
    fn = call.func
    return (isinstance(fn, ast.Name) and fn.id == "gather") or (isinstance(fn, ast.Attribute) and fn.attr == "gather")


def _classify_calls(tree: ast.Module, info: CodeInfo, offsets: list[int]) -> None:
    awaited: list[ast.Call] = []
    task_names: set[str] = set()

    def tasks_in(expr: ast.expr | None) -> None:
        """Mark the calls an expression yields as tasks (coroutines to be awaited)."""
        if expr is None:
            return
        if isinstance(expr, ast.Call):
            if _is_gather(expr):
                return
            awaited.append(expr)
        elif isinstance(expr, ast.Starred):
            tasks_in(expr.value)
        elif isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            for elt in expr.elts:
                tasks_in(elt)
        elif isinstance(expr, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
            tasks_in(expr.elt)
        elif isinstance(expr, ast.IfExp):
            tasks_in(expr.body)
            tasks_in(expr.orelse)
        elif isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            tasks_in(expr.left)
            tasks_in(expr.right)
        elif isinstance(expr, ast.Name):
            task_names.add(expr.id)

    nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Call):
            info._all_spans.add(_span(node, offsets))
            if _is_gather(node):
                for arg in node.args:
                    tasks_in(arg)
        elif isinstance(node, ast.Await):
            tasks_in(node.value)
    # Names that hold tasks: whatever is assigned or appended to them builds tasks too.
    known: set[str] = set()
    while task_names - known:
        known |= task_names
        for node in nodes:
            if (isinstance(node, ast.Assign) and any(_names_in_target(t) & task_names for t in node.targets)) or (
                isinstance(node, (ast.AugAssign, ast.AnnAssign)) and _names_in_target(node.target) & task_names
            ):
                tasks_in(node.value)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "extend", "insert")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in task_names
            ):
                for arg in node.args:
                    tasks_in(arg)
    for call in awaited:
        start, end = _span(call, offsets)
        info.awaited_spans.add((start, end))
        info.awaited_starts.add(start)


_LOOPS = (ast.For, ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SLEEPS = ("sleep",)


def _count_sites(tree: ast.Module, info: CodeInfo, offsets: list[int]) -> None:
    """Which calls of the notebook's functions (and of ``signal``, ``asyncio.sleep``) the code
    makes, for progress views: a site outside loops, helpers and comprehensions runs at most
    once (``single_sites``); a gathered comprehension announces all its calls at once; any
    other site (in a loop, a helper, a comprehension run call by call) makes ``open_total``."""
    singles: set[int] = set()
    open_total = False

    def external(call: ast.Call) -> bool:
        fn = call.func
        if isinstance(fn, ast.Name):
            return fn.id == "signal" or fn.id in info.free_names
        return isinstance(fn, ast.Attribute) and fn.attr in _SLEEPS

    def visit(node: ast.AST, looped: bool, comprehension: bool) -> None:
        nonlocal open_total
        if isinstance(node, ast.Call) and not _is_gather(node) and external(node):
            start = _span(node, offsets)[0]
            if looped or (comprehension and start not in info.awaited_starts):
                open_total = True
            elif not comprehension:
                singles.add(start)
        inner_loop = looped or isinstance(node, _LOOPS)
        inner_comp = comprehension or isinstance(node, _COMPREHENSIONS)
        for child in ast.iter_child_nodes(node):
            visit(child, inner_loop, inner_comp)

    visit(tree, False, False)
    info.single_sites = frozenset(singles)
    info.open_total = open_total


def _names_in_target(target: ast.expr) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


class _Scope:
    def __init__(self, node: ast.AST, parent: _Scope | None) -> None:
        self.node = node
        self.parent = parent
        self.bound: set[str] = set()
        self.globals: set[str] = set()
        self.is_class = isinstance(node, ast.ClassDef)


def _find_names(tree: ast.Module, info: CodeInfo) -> None:
    scopes: dict[ast.AST, _Scope] = {}
    module = scopes[tree] = _Scope(tree, None)
    export_order: list[str] = []
    not_exported: set[str] = set()

    def bind(scope: _Scope, name: str, exportable: bool) -> None:
        target = module if name in scope.globals else scope
        target.bound.add(name)
        if target is module:
            if exportable:
                if name not in export_order:
                    export_order.append(name)
            else:
                not_exported.add(name)

    def visit(node: ast.AST, scope: _Scope) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(scope, node.name, exportable=False)
            for deco in node.decorator_list:
                visit(deco, scope)
            if not isinstance(node, ast.ClassDef):
                for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                    visit(default, scope)
            inner = scopes[node] = _Scope(node, scope)
            if not isinstance(node, ast.ClassDef):
                for arg in _all_args(node.args):
                    inner.bound.add(arg)
            for child in node.body:
                visit(child, inner)
            return
        if isinstance(node, ast.Lambda):
            inner = scopes[node] = _Scope(node, scope)
            inner.bound.update(_all_args(node.args))
            visit(node.body, inner)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = scopes[node] = _Scope(node, scope)
            for index, gen in enumerate(node.generators):
                visit(gen.iter, scope if index == 0 else inner)
                for name in _names_in_target(gen.target):
                    inner.bound.add(name)
                for cond in gen.ifs:
                    visit(cond, inner)
            elts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            for elt in elts:
                visit(elt, inner)
            return
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            if isinstance(node, ast.Global):
                scope.globals.update(node.names)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bind(scope, node.id, exportable=True)
        elif isinstance(node, ast.NamedExpr):
            owner = scope
            while isinstance(owner.node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                owner = owner.parent  # type: ignore[assignment]
            bind(owner, node.target.id, exportable=True)
            visit(node.value, scope)
            return
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bind(scope, (alias.asname or alias.name).split(".")[0], exportable=False)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bind(scope, node.name, exportable=False)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bind(scope, node.name, exportable=True)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bind(scope, node.rest, exportable=True)
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    for stmt in tree.body:
        visit(stmt, module)

    def resolve(node: ast.AST, scope: _Scope) -> None:
        for child in ast.iter_child_nodes(node):
            child_scope = scopes.get(child, scope)
            if (
                isinstance(child, ast.Name)
                and isinstance(child.ctx, ast.Load)
                and not _is_bound(child.id, scope, module)
                and child.id not in SANDBOX_NAMES
            ):
                info.free_names.setdefault(child.id, child.lineno)
            resolve(child, child_scope)

    resolve(tree, module)
    info.exports = [n for n in export_order if n not in not_exported and not n.startswith("__")]


def _is_bound(name: str, scope: _Scope, module: _Scope) -> bool:
    current: _Scope | None = scope
    first = True
    while current is not None:
        if (first or not current.is_class) and name in current.bound:
            return True
        first = False
        current = current.parent
    return name in module.bound


def _all_args(args: ast.arguments) -> list[str]:
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if args.vararg:
        names.append(args.vararg.arg)
    if args.kwarg:
        names.append(args.kwarg.arg)
    return names
