"""Replay state of Responses conversation chains, with no I/O.

A chain is a sequence of responses linked by ``previous_response_id``. For each completed response the
state keeps the full input context the upstream would hold after it: the request's full input followed by
the response's output items. History is stored as a linked list of immutable nodes (one per turn) shared
between a chain and every response id that points into it, so a turn costs only its own items and the full
input list is materialized only when a replay is actually sent.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

Item = dict[str, Any]

TERMINAL_OK = "response.completed"
TERMINAL_FAILED = frozenset({"response.failed", "response.incomplete", "error"})
TERMINAL = TERMINAL_FAILED | {TERMINAL_OK}  # the events that end a turn


_anonymous = itertools.count(1)


class RequestError(ValueError):
    """A response.create the state cannot interpret (the upstream will answer it itself)."""


def normalize_input(value: Any) -> list[Item]:
    """The input field as a list of items; a string is one user message, as the upstream reads it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise RequestError(f"input must be a string or a list, not {type(value).__name__}")


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)  # weakref: tests prove nodes are freed
class Node:
    """One turn's items (new input, then output) on top of the history before it."""

    parent: Node | None
    items: tuple[Item, ...]
    size: int  # approximate JSON bytes of this node's items
    total_size: int
    length: int  # items from the start of the chain up to and including this node

    @staticmethod
    def extend(parent: Node | None, items: list[Item], size: int) -> Node | None:
        if not items and parent is not None:
            return parent
        base_size = parent.total_size if parent else 0
        base_len = parent.length if parent else 0
        return Node(parent, tuple(items), size, base_size + size, base_len + len(items))

    def materialize(self) -> list[Item]:
        parts: list[tuple[Item, ...]] = []
        node: Node | None = self
        while node is not None:
            parts.append(node.items)
            node = node.parent
        out: list[Item] = []
        for part in reversed(parts):
            out.extend(part)
        return out


def materialize(node: Node | None) -> list[Item]:
    return node.materialize() if node is not None else []


@dataclass(slots=True)
class ResponseRecord:
    """What is known about one completed response."""

    response_id: str
    history: Node | None  # full context after this response; None when evicted by the size cap
    store: bool  # stored server-side: previous_response_id works on any connection
    complete: bool = True  # False when the history was evicted and cannot be replayed
    principal: str = ""  # fingerprint of the credentials that made it: only they may resume it


class ChainStore:
    """Response records kept across flows, so a client that reconnects can be resumed.

    Bounded two ways: an LRU cap on the number of records, and a resume TTL: when a session ends its records are
    retired with a deadline, and :meth:`sweep` (the caller passes the clock) frees them after it unless a new
    session resumed the chain in the meantime.
    """

    def __init__(self, max_records: int = 10_000) -> None:
        self.max_records = max_records
        self._records: OrderedDict[str, ResponseRecord] = OrderedDict()
        self._deadlines: dict[str, float] = {}  # retired response id -> when it may be freed
        self.evicted = 0
        self.expired = 0

    def put(self, record: ResponseRecord) -> int:
        """Insert a record; return how many old records were evicted to make room."""
        self._records[record.response_id] = record
        self._records.move_to_end(record.response_id)
        dropped = 0
        while len(self._records) > self.max_records:
            old, _ = self._records.popitem(last=False)
            self._deadlines.pop(old, None)
            dropped += 1
        self.evicted += dropped
        return dropped

    def get(self, response_id: str, principal: str = "") -> ResponseRecord | None:
        """A record by id, for the principal that made it (as the upstream refuses another organisation's response
        ids, another principal gets nothing); a retired one is adopted again (a client resumed its chain before the
        TTL ran out)."""
        record = self._records.get(response_id)
        if record is not None and record.principal != principal:
            return None
        if record is not None:
            self._records.move_to_end(response_id)
            self._deadlines.pop(response_id, None)
        return record

    def retire(self, response_ids: Iterable[str], deadline: float) -> None:
        """The session that made these records ended: they may be freed at ``deadline``."""
        for response_id in response_ids:
            if response_id in self._records:
                self._deadlines[response_id] = deadline

    def sweep(self, now: float) -> int:
        """Free retired records whose deadline passed; returns how many."""
        due = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
        for rid in due:
            del self._deadlines[rid]
            self._records.pop(rid, None)
        self.expired += len(due)
        return len(due)

    @property
    def retired(self) -> int:
        return len(self._deadlines)

    def __len__(self) -> int:
        return len(self._records)

    def clear(self) -> None:
        self._records.clear()
        self._deadlines.clear()


@dataclass(slots=True)
class Turn:
    """One response.create and what came back for it."""

    number: int
    request: dict[str, Any]
    raw: str
    previous_id: str | None
    store: bool
    generate: bool
    new_items: list[Item]
    base: Node | None  # history the new items continue
    base_known: bool  # False when previous_response_id names a response this state never saw (or evicted)
    base_store: bool  # the previous response is stored server-side
    client_sent_full: bool = False  # the client resent the whole history itself (no previous_response_id)
    response_id: str | None = None
    outputs: list[Item] = field(default_factory=list)
    output_size: int = 0
    forwarded: bool = False  # any event of this turn reached the client
    events: int = 0  # upstream events of this turn so far (of the current attempt)
    attempts: int = 0  # recoveries tried for this turn
    status: str = "in_progress"

    def full_input(self) -> list[Item] | None:
        """The turn's input as the upstream should see it without previous_response_id (None if unknown)."""
        if not self.base_known:
            return None
        return materialize(self.base) + self.new_items

    def replay_request(self) -> dict[str, Any]:
        """The request rewritten for a fresh connection: no previous_response_id, the full input."""
        full = self.full_input()
        if full is None:
            raise RequestError("the history of this turn is not known")
        body = {k: v for k, v in self.request.items() if k != "previous_response_id"}
        body["input"] = full
        return body


@dataclass(frozen=True, slots=True)
class TurnResult:
    turn: Turn
    ok: bool
    evicted_bytes: int = 0  # history dropped because the chain outgrew max_chain_bytes
    evicted_records: int = 0  # response records dropped from the cross-flow store


class Chain:
    """Replay state of one client session (one WebSocket flow)."""

    def __init__(self, store: ChainStore, max_chain_bytes: int = 256 * 2**20, principal: str = "") -> None:
        self.store = store
        self.max_chain_bytes = max_chain_bytes
        # Whose credentials this session carries (a fingerprint). A session with none is a principal of its own: it
        # never resumes another flow's chain and is never resumed by one (nothing says the two are the same client).
        self.principal = principal or f"anonymous:{next(_anonymous)}"
        self.head: ResponseRecord | None = None  # last completed response of this session
        self.cached_id: str | None = None  # response held in the current upstream connection's cache
        self.turn: Turn | None = None  # the turn in flight
        self._numbers = itertools.count(1)
        self.completed = 0
        self.failed = 0
        self.response_ids: list[str] = []  # records this session made or resumed (retired when it ends)

    # -- requests ---------------------------------------------------------------------------------
    def begin_turn(self, request: dict[str, Any], raw: str) -> Turn:
        """Record a response.create the client sent. Raises RequestError for input it cannot read."""
        new_items = normalize_input(request.get("input"))
        previous_id = request.get("previous_response_id") or None
        if previous_id is not None and not isinstance(previous_id, str):
            raise RequestError("previous_response_id must be a string")
        store = request.get("store", True) is not False
        generate = request.get("generate", True) is not False
        base: Node | None = None
        known = True
        base_store = False
        sent_full = False
        if previous_id is not None:
            record = self._lookup(previous_id)
            known = record is not None and record.complete
            base = record.history if record is not None else None
            base_store = record.store if record is not None else False
        elif self.head is not None and self.head.complete and self.head.history is not None:
            history = self.head.history
            if len(new_items) >= history.length and new_items[: history.length] == history.materialize():
                base, new_items, sent_full = history, new_items[history.length :], True
        turn = Turn(
            number=next(self._numbers),
            request=request,
            raw=raw,
            previous_id=previous_id,
            store=store,
            generate=generate,
            new_items=new_items,
            base=base,
            base_known=known,
            base_store=base_store,
            client_sent_full=sent_full,
        )
        self.turn = turn
        return turn

    def _lookup(self, response_id: str) -> ResponseRecord | None:
        if self.head is not None and self.head.response_id == response_id:
            return self.head
        record = self.store.get(response_id, self.principal)
        if record is not None and response_id not in self.response_ids:
            self.response_ids.append(response_id)  # resumed from another session: ours to retire now
        return record

    def needs_rewrite(self, turn: Turn) -> bool:
        """True when the current upstream connection cannot resolve the turn's previous_response_id."""
        if turn.previous_id is None or turn.base_store:
            return False
        return turn.previous_id != self.cached_id

    def connection_reset(self) -> None:
        """A new upstream connection: its cache is empty."""
        self.cached_id = None

    # -- events -----------------------------------------------------------------------------------
    def on_event(self, event: dict[str, Any], size: int) -> TurnResult | None:
        """Feed one upstream event; returns a result when it ends the turn in flight."""
        turn = self.turn
        kind = event.get("type")
        if turn is None or not isinstance(kind, str):
            return None
        if kind == "response.output_item.done":
            item = event.get("item")
            if isinstance(item, dict):
                turn.outputs.append(item)
                turn.output_size += size
            return None
        if kind == "response.created":
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                turn.response_id = response["id"]
            return None
        if kind == TERMINAL_OK:
            response = event.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("id"), str):
                    turn.response_id = response["id"]
                if not turn.outputs and isinstance(response.get("output"), list):
                    turn.outputs = [i for i in response["output"] if isinstance(i, dict)]
                    turn.output_size = size
            return self._finish(turn, ok=turn.response_id is not None)
        if kind in TERMINAL_FAILED:
            turn.status = kind
            return self._finish(turn, ok=False)
        return None

    def abort_turn(self) -> Turn | None:
        """The turn ends without a response (failed closed or the client left)."""
        turn = self.turn
        if turn is not None:
            turn.status = "aborted"
            self.turn = None
            self.failed += 1
            self.cached_id = None
        return turn

    def _finish(self, turn: Turn, ok: bool) -> TurnResult:
        self.turn = None
        if not ok:
            # The upstream evicts the referenced response after any error: the next continuation
            # cannot rely on the connection's cache.
            self.failed += 1
            self.cached_id = None
            return TurnResult(turn, ok=False)
        turn.status = "completed"
        self.completed += 1
        assert turn.response_id is not None
        evicted_bytes = 0
        if turn.base_known:
            # A client that resent its whole history sent the known prefix again: count only its new items.
            input_size = len(json.dumps(turn.new_items)) if turn.client_sent_full else len(turn.raw)
            size = input_size + turn.output_size
            history = Node.extend(turn.base, turn.new_items + turn.outputs, size)
            if history is not None and history.total_size > self.max_chain_bytes:
                evicted_bytes = history.total_size
                history = None
        else:
            history = None
        record = ResponseRecord(turn.response_id, history, turn.store, complete=history is not None,
                                principal=self.principal)
        self.head = record
        self.cached_id = turn.response_id
        self.response_ids.append(turn.response_id)
        dropped = self.store.put(record)
        return TurnResult(turn, ok=True, evicted_bytes=evicted_bytes, evicted_records=dropped)
