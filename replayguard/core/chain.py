"""Replay state of Responses conversation chains, with no I/O.

A chain is a sequence of responses linked by ``previous_response_id``. For each completed response the
state keeps the full input context the upstream would hold after it: the request's full input followed by
the response's output items. History is stored as a linked list of immutable nodes (one per turn) shared
between a chain and every response id that points into it, so a turn costs only its own items and the full
input list is materialized only when a replay is actually sent. The nodes form a tree: a fork (a create on
another lane continuing an older response) shares the history before it.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable

Item = dict[str, Any]

TERMINAL_OK = "response.completed"
# Why an incomplete response still joins the chain: the upstream keeps it (with the output it got to), and a client
# may continue it (after max_output_tokens, or after steering, where the successor continues it).
KEPT = frozenset({TERMINAL_OK, "response.incomplete"})
TERMINAL_FAILED = frozenset({"response.failed", "error"})
TERMINAL = KEPT | TERMINAL_FAILED  # the events that end a turn


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


Lane = str | None  # a create's stream_id: requests on one lane run in order, lanes run side by side


@dataclass(slots=True, eq=False)
class Turn:
    """One response.create (or an automatic successor the upstream started after steering) and what came back."""

    number: int
    request: dict[str, Any]
    raw: str  # the client's message as it came ("" for an automatic successor: the client sent none)
    previous_id: str | None
    store: bool
    generate: bool
    new_items: list[Item]  # what this turn adds to its base: queued steering input first, then the create's input
    base: Node | None  # history the new items continue
    base_known: bool  # False when previous_response_id names a response this state never saw (or evicted)
    base_store: bool  # the previous response is stored server-side
    lane: Lane = None
    automatic: bool = False  # the upstream started it (a steered response's successor), not a client create
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

    def resend_request(self) -> dict[str, Any]:
        """The request as the upstream saw it, for a connection that holds (or stores) its previous response: the
        client's own create, or for an automatic successor the create that stands for it."""
        if not self.automatic:
            return self.request
        body = dict(self.request, input=self.new_items)
        if self.previous_id is not None:
            body["previous_response_id"] = self.previous_id
        return body


@dataclass(frozen=True, slots=True)
class TurnResult:
    turn: Turn
    ok: bool  # the response joined the chain (completed, or incomplete with its output so far)
    evicted_bytes: int = 0  # history dropped because the chain outgrew max_chain_bytes
    evicted_records: int = 0  # response records dropped from the cross-flow store


def resolves(turn: Turn, cached: Collection[str]) -> bool:
    """True when a connection holding ``cached`` (the last response of each of its lanes) serves the turn's
    previous_response_id as the client sent it."""
    return turn.previous_id is None or turn.base_store or turn.previous_id in cached


class Chain:
    """Replay state of one client session (one WebSocket flow): every turn's input and output, per lane."""

    def __init__(self, store: ChainStore, max_chain_bytes: int = 256 * 2**20, principal: str = "") -> None:
        self.store = store
        self.max_chain_bytes = max_chain_bytes
        # Whose credentials this session carries (a fingerprint). A session with none is a principal of its own: it
        # never resumes another flow's chain and is never resumed by one (nothing says the two are the same client).
        self.principal = principal or f"anonymous:{next(_anonymous)}"
        self.heads: dict[Lane, ResponseRecord] = {}  # the last response of each lane of this session
        self._numbers = itertools.count(1)
        self.completed = 0
        self.failed = 0
        self.response_ids: list[str] = []  # records this session made or resumed (retired when it ends)

    @property
    def head(self) -> ResponseRecord | None:
        """The last response of the default lane (no stream_id)."""
        return self.heads.get(None)

    # -- requests ---------------------------------------------------------------------------------
    def begin_turn(self, request: dict[str, Any], raw: str, lane: Lane = None, prepend: list[Item] | None = None) -> Turn:
        """Record a response.create the client sent. Raises RequestError for input it cannot read. ``prepend``:
        steering input the upstream holds for this continuation and puts before the create's own input."""
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
        head = self.heads.get(lane)
        if previous_id is not None:
            record = self.lookup(previous_id)
            known = record is not None and record.complete
            base = record.history if record is not None else None
            base_store = record.store if record is not None else False
        elif head is not None and head.complete and head.history is not None:
            history = head.history
            if len(new_items) >= history.length and new_items[: history.length] == history.materialize():
                base, new_items, sent_full = history, new_items[history.length :], True
        return Turn(
            number=next(self._numbers),
            request=request,
            raw=raw,
            previous_id=previous_id,
            store=store,
            generate=generate,
            new_items=[*(prepend or ()), *new_items],
            base=base,
            base_known=known,
            base_store=base_store,
            lane=lane,
            client_sent_full=sent_full,
        )

    def begin_successor(self, parent: Turn, steered: list[Item]) -> Turn:
        """The response the upstream starts by itself after steering: it continues ``parent`` with the steered
        input and inherits its settings."""
        record = self.lookup(parent.response_id) if parent.response_id is not None else None
        settings = {k: v for k, v in parent.request.items() if k not in ("input", "previous_response_id")}
        return Turn(
            number=next(self._numbers),
            request=settings,
            raw="",
            previous_id=parent.response_id,
            store=parent.store,
            generate=True,
            new_items=list(steered),
            base=record.history if record is not None else None,
            base_known=record is not None and record.complete,
            base_store=record.store if record is not None else False,
            lane=parent.lane,
            automatic=True,
        )

    def lookup(self, response_id: str) -> ResponseRecord | None:
        """A response of this session, or one its principal made in another flow (adopted: retired with ours)."""
        for head in self.heads.values():
            if head.response_id == response_id:
                return head
        record = self.store.get(response_id, self.principal)
        if record is not None and response_id not in self.response_ids:
            self.response_ids.append(response_id)  # resumed from another session: ours to retire now
        return record

    # -- events -----------------------------------------------------------------------------------
    def on_event(self, turn: Turn, event: dict[str, Any], size: int) -> TurnResult | None:
        """Feed one upstream event of ``turn``; returns a result when it ends the turn (an ``error`` that answers
        the turn's create ends it too: the caller decides which error answers which message)."""
        kind = event.get("type")
        if not isinstance(kind, str):
            return None
        if kind == "response.output_item.done":
            item = event.get("item")
            if isinstance(item, dict):
                turn.outputs.append(item)
                turn.output_size += size
            return None
        if kind in ("response.created", "response.queued"):
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                turn.response_id = response["id"]
            return None
        if kind in KEPT:
            response = event.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("id"), str):
                    turn.response_id = response["id"]
                if not turn.outputs and isinstance(response.get("output"), list):
                    turn.outputs = [i for i in response["output"] if isinstance(i, dict)]
                    turn.output_size = size
            turn.status = "completed" if kind == TERMINAL_OK else kind
            return self._finish(turn, ok=turn.response_id is not None)
        if kind in TERMINAL_FAILED:
            turn.status = kind
            return self._finish(turn, ok=False)
        return None

    def abort(self, turn: Turn) -> None:
        """The turn ends without a response (failed closed, or the client left)."""
        if turn.status == "in_progress":
            turn.status = "aborted"
            self.failed += 1

    def _finish(self, turn: Turn, ok: bool) -> TurnResult:
        if not ok:
            self.failed += 1
            return TurnResult(turn, ok=False)
        if turn.status == "completed":
            self.completed += 1
        assert turn.response_id is not None
        evicted_bytes = 0
        if turn.base_known:
            # A client that resent its whole history sent the known prefix again: count only its new items.
            input_size = len(json.dumps(turn.new_items)) if turn.client_sent_full or not turn.raw else len(turn.raw)
            size = input_size + turn.output_size
            history = Node.extend(turn.base, turn.new_items + turn.outputs, size)
            if history is not None and history.total_size > self.max_chain_bytes:
                evicted_bytes = history.total_size
                history = None
        else:
            history = None
        record = ResponseRecord(turn.response_id, history, turn.store, complete=history is not None,
                                principal=self.principal)
        self.heads[turn.lane] = record
        self.response_ids.append(turn.response_id)
        dropped = self.store.put(record)
        return TurnResult(turn, ok=True, evicted_bytes=evicted_bytes, evicted_records=dropped)
