"""Batched gathers: one Monty call announces a whole comprehension of notebook calls.

The analysis rewrites ``await gather(*[f(a) for x in xs])`` into ``await __dm_gather__('f',
[((a,), {}) for x in xs])`` (:func:`..analysis.rewrite_gathers`). Monty builds the argument
tuples itself and the host gets them in one call; each becomes a call of its own (its row, its
attempts, retries, timeouts, reuse), with the gather's Monty call id in its row. The gather is
answered as asyncio's would be: the list of results in order once every call is done, or the
first failure as soon as it is known (the other calls go on, their results journaled as usual).

Call ids stay the ones the same code run call by call would have: a gather of ``n`` calls that
Monty numbered ``C`` gets the ids ``h(C)`` to ``h(C) + n - 1`` and every later Monty id moves up
by ``n - 1`` (:meth:`Gathers._host_id`). The gathers in the store (``gather_id``) give the shifts
back on a resume. An empty gather keeps its id unused.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic_monty import FunctionSnapshot

from ...errors import ValueCrossingError
from .calls import CallState

if TYPE_CHECKING:
    from .loop import Driver

GATHERED = CallState(-2, "", "call", "[]", True)
"""Stands for the gather itself: answered with a future, like any awaited call."""


@dataclass(slots=True, eq=False)
class Gather:
    """One batched gather: its Monty call id and its calls, in order."""

    call_id: int
    members: list[int]
    results: list[Any]
    left: int = 0
    answered: bool = False


class Gathers:
    """Mixin of :class:`Driver`: batched gathers (see the module docstring)."""

    def _init_gathers(self: Driver) -> None:
        self._gathers: dict[int, Gather] = {}  # by Monty call id
        self._member_of: dict[int, tuple[Gather, int]] = {}  # calls whose answer is still to route
        self._gather_answers: dict[int, dict[str, Any]] = {}  # by Monty call id, until Monty takes them
        self._new_gathers: list[int] = []  # announced since the last checkpoint
        self._shift_at: list[int] = []  # Monty ids of the (non-empty) gathers, ascending
        self._shift_sum: list[int] = []  # how far the ids after each one move up

    def _host_id(self: Driver, monty_id: int) -> int:
        """The id of the call Monty numbers ``monty_id`` (the same as Monty's without gathers)."""
        if not self._shift_at:
            return monty_id
        k = bisect.bisect_left(self._shift_at, monty_id)
        return monty_id + (self._shift_sum[k - 1] if k else 0)

    def _reshift(self: Driver) -> None:
        self._shift_at, self._shift_sum, total = [], [], 0
        for call_id in sorted(self._gathers):
            size = len(self._gathers[call_id].members)
            if size:
                total += size - 1
                self._shift_at.append(call_id)
                self._shift_sum.append(total)

    def _announce_gather(self: Driver, snap: FunctionSnapshot) -> tuple[CallState, dict[str, Any] | None]:
        """Register the calls of a batched gather; answer the gather itself with a future."""
        name, items = snap.args
        if not items:
            self._gather_answers[snap.call_id] = {"return_value": []}
            return GATHERED, None
        fn = self._function(name)
        if fn is None:
            return GATHERED, {
                "exc_type": "NameError",
                "message": f"name {name!r} is not defined (not a function of the namespace)",
            }
        fingerprint, _ = self._describe_function(name, fn)
        encode = self.codec.encode_arguments
        what = f"an argument of {name}()"
        try:  # all or none: like asyncio, no call starts when one of them cannot be made
            texts = [encode(args, kwargs, what=what) for args, kwargs in items]
        except ValueCrossingError as exc:
            return GATHERED, {"exc_type": "TypeError", "message": str(exc)}
        first = self._host_id(snap.call_id)
        gather = Gather(snap.call_id, list(range(first, first + len(texts))), [None] * len(texts))
        self._gathers[snap.call_id] = gather
        self._new_gathers.append(snap.call_id)
        self._shift_at.append(snap.call_id)  # Monty's ids only grow: the list stays sorted
        self._shift_sum.append((self._shift_sum[-1] if self._shift_sum else 0) + len(texts) - 1)
        reuse = self.reuse_key is not None and name not in self.rerun_functions
        prefix = hashlib.sha256(f"{name}\0{fingerprint}\0".encode())  # the call key: sha256 of name, fingerprint, args
        states, keys = [], []
        member_of = self._member_of
        for index, (call_id, args_text, item) in enumerate(zip(gather.members, texts, items, strict=True)):
            states.append(CallState(call_id, name, "call", args_text, True, fingerprint, item))
            digest = prefix.copy()
            digest.update(args_text.encode())
            if '"$h"' in args_text:
                digest.update(self._classes_of(args_text).encode())
            keys.append(digest.hexdigest())
            member_of[call_id] = (gather, index)
        self._register_gathered(states, keys, snap.call_id)
        (self._to_reuse if reuse else self._to_dispatch).extend(states)
        gather.left = len(texts)
        return GATHERED, None

    def _route_gathered(self: Driver) -> None:
        """Answers of gathered calls make up their gather's answer (asyncio's: all results, or
        the first failure)."""
        member_of, answers = self._member_of, self.answers
        for call_id in [c for c in answers if c in member_of]:
            gather, index = member_of.pop(call_id)
            answer = answers.pop(call_id)
            if gather.answered:
                continue
            if "return_value" in answer:
                gather.results[index] = answer["return_value"]
                gather.left -= 1
                if gather.left == 0:
                    gather.answered = True
                    self._gather_answers[gather.call_id] = {"return_value": gather.results}
                    gather.results = []
            else:
                gather.answered = True
                self._gather_answers[gather.call_id] = answer
                gather.results = []

    def _restore_gather(self: Driver, gather_id: int, call_id: int) -> None:
        """A gathered call read back from the store (rows come in call id order)."""
        gather = self._gathers.get(gather_id)
        if gather is None:
            gather = self._gathers[gather_id] = Gather(gather_id, [], [])
        gather.members.append(call_id)

    def _rearm_gathers(self: Driver) -> None:
        """Every gather waits for its calls' answers again (after a restore or a sandbox crash,
        when Monty may wait for a gather it was answered before)."""
        self._member_of, self._gather_answers = {}, {}
        self._reshift()
        for gather in self._gathers.values():
            gather.results, gather.left, gather.answered = [None] * len(gather.members), len(gather.members), False
            for index, call_id in enumerate(gather.members):
                self._member_of[call_id] = (gather, index)

    def _forget_new_gathers(self: Driver) -> None:
        """Gathers announced after the latest checkpoint (the sandbox crashed): Monty announces them again."""
        for call_id in self._new_gathers:
            self._gathers.pop(call_id, None)
        self._new_gathers = []
        self._reshift()
