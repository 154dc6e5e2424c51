"""A model of the Responses API over WebSocket as the documented upstream behaves, with no I/O.

Shared by the bundled fake upstream (:mod:`replayguard.tools.fake_upstream`, which puts it on a real WebSocket) and
by the in-process tests that drive replayguard's protocol core against it. What it models (see
../shared/notes/responses-websocket.md and the openai SDK's server-event types):

* **Lanes**: a create's ``stream_id`` names its lane; each lane runs its creates in order (a create behind another
  is answered ``response.queued``), lanes run side by side, and every event of a response echoes its lane. No
  ``stream_id`` is one lane that runs one response at a time: a second create while one streams is refused.
* **The connection-local cache**: each connection holds the last response of each of its lanes; a
  ``previous_response_id`` resolves against those (a create on one lane may fork another lane's response) or a
  stored response (``store=true``, server-wide for the same credentials). An error evicts the response it named.
* **Validation** in the upstream's order: JSON, previous_response_id, then the call_id pairing of the whole context
  ("No tool call found for function call output with call_id ...", "No tool output found for function call ...")
  and item references under ``store=false``.
* **Terminal events**: ``response.completed``; ``response.incomplete`` (``max_output_tokens``, or ``steered``),
  which the upstream keeps and a client may continue; ``response.failed``, which it does not keep.
* **Steering**: ``response.steer`` is ``accepted`` while its target response is generating and applied at the next
  output-item boundary: the response ends ``incomplete`` (reason ``steered``) and an automatic successor follows
  (``response.created`` ... ``response.completed``, no client create). Input accepted when the response ends waiting
  for client tool output stays queued (``response.steer.pending``) and is prepended to the next create that
  continues that response on its lane. ``response.steer.failed`` otherwise.
* **Errors answering a message** (an unknown event type, a second create on a busy default lane, a bad steer) are
  sent at once, while other responses go on streaming.
* **Handshakes** refused with 401, 403, 429 (JSON body, ``Retry-After``) or 5xx, and the connection-age limit
  (``websocket_connection_limit_reached``).

The scripted model answering creates is deterministic: a user message containing TOOL gets a function_call
(TOOL2: two), a tool output gets an assistant message quoting it, anything else an assistant message.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

Event = dict[str, Any]
Item = dict[str, Any]

OUTPUT_CALLS = {
    "function_call_output": ("function_call", "local_shell_call"),
    "custom_tool_call_output": ("custom_tool_call",),
    "tool_search_output": ("tool_search_call",),
    "computer_call_output": ("computer_call",),
}
NEEDS_OUTPUT = ("function_call", "custom_tool_call", "local_shell_call")
TERMINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
CALLS = ("function_call", "custom_tool_call", "local_shell_call", "tool_search_call", "computer_call")

CONNECTION_LIMIT_EVENT: Event = {"type": "error", "status": 400, "error": {
    "type": "invalid_request_error", "code": "websocket_connection_limit_reached",
    "message": "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to "
               "continue.", "param": None}}

# What the upstream answers a refused handshake with, per status (the body of the HTTP response).
REFUSALS: dict[int, tuple[str, str | None, str]] = {
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 7s."),
}


class RequestFailed(Exception):
    """A message the upstream answers with an ``error`` event."""

    def __init__(self, status: int, code: str | None, message: str, param: str | None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.event: Event = {"type": "error", "status": status,
                             "error": {"type": type_, "code": code, "message": message, "param": param}}


def text_of(item: Item) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def validate(context: list[Any], store: bool) -> None:
    """The upstream's input validation, in the order it reports problems."""
    calls: set[str] = set()
    approvals: set[str] = set()
    for index, item in enumerate(context):
        if not isinstance(item, dict):
            raise RequestFailed(400, None, "Invalid input item.", "input")
        kind = item.get("type")
        for key in ("type", "call_id"):
            if key in item and not isinstance(item[key], str):
                got = {dict: "an object", list: "an array"}.get(type(item[key]), type(item[key]).__name__)
                raise RequestFailed(400, "invalid_type", f"Invalid type for 'input[{index}].{key}': expected a string, "
                                    f"but got {got} instead.", f"input[{index}].{key}")
        if kind == "item_reference" or ("id" in item and len(item) <= 2 and set(item) <= {"id", "type"}):
            if not store:
                raise RequestFailed(400, None, f"Item with id '{item.get('id')}' not found. Items are not persisted "
                                    "when store is false.", "input")
        if kind in CALLS:
            calls.add(f"{kind}:{item.get('call_id')}")
        elif kind == "mcp_approval_request":
            approvals.add(str(item.get("id")))
        elif kind in OUTPUT_CALLS:
            if not any(f"{c}:{item.get('call_id')}" in calls for c in OUTPUT_CALLS[kind]):
                raise RequestFailed(400, None, "No tool call found for function call output with call_id "
                                    f"{item.get('call_id')}.", "input")
        elif kind == "mcp_approval_response" and str(item.get("approval_request_id")) not in approvals:
            raise RequestFailed(400, None, "No approval request found for approval_request_id "
                                f"{item.get('approval_request_id')}.", "input")
    answered = {i.get("call_id") for i in context if isinstance(i, dict) and i.get("type") in OUTPUT_CALLS}
    for item in context:
        if isinstance(item, dict) and item.get("type") in NEEDS_OUTPUT and item.get("call_id") not in answered:
            raise RequestFailed(400, None, f"No tool output found for function call {item.get('call_id')}.", "input")


def _wants_failure(context: list[Any]) -> bool:
    """The scripted model fails (response.failed) a request whose last user message says FAIL."""
    last = next((i for i in reversed(context) if isinstance(i, dict) and i.get("role") == "user"), None)
    return last is not None and "FAIL" in text_of(last)


def input_items(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestFailed(400, None, "Invalid type for 'input'.", "input")
    return value


# -- what the upstream sends ----------------------------------------------------------------------------------
def response_object(rid: str, request: dict[str, Any], status: str, output: list[Item], *, created_at: int = 0,
                    usage: dict[str, Any] | None = None, previous: str | None = None,
                    incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``response`` object with every field the SDK's ``Response`` type requires."""
    return {
        "id": rid, "object": "response", "created_at": created_at, "status": status,
        "model": request.get("model") if isinstance(request.get("model"), str) else "gpt-5",
        "output": output, "parallel_tool_calls": request.get("parallel_tool_calls", True) is not False,
        "tool_choice": request.get("tool_choice", "auto") if isinstance(request.get("tool_choice"), (str, dict))
        else "auto",
        "tools": request.get("tools") if isinstance(request.get("tools"), list) else [],
        "store": request.get("store", True) is not False, "previous_response_id": previous,
        "instructions": request.get("instructions") if isinstance(request.get("instructions"), str) else None,
        "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
        "incomplete_details": {"reason": incomplete} if incomplete else None, "error": error,
        "usage": usage,
    }


def usage_of(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def item_events(index: int, item: Item, chunk: int = 5) -> Iterator[Event]:
    """The events that stream one output item (without sequence numbers or stream_id)."""
    added = dict(item, status="in_progress")
    if item.get("type") == "message":
        added["content"] = []
    if item.get("type") == "reasoning":
        added["summary"] = []
    yield {"type": "response.output_item.added", "output_index": index, "item": added}
    if item.get("type") == "message":
        part = item["content"][0]
        text = part.get("text", "")
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        yield {"type": "response.content_part.added", **common, "part": {"type": "output_text", "text": "",
                                                                            "annotations": [], "logprobs": []}}
        for i in range(0, len(text), chunk):
            yield {"type": "response.output_text.delta", **common, "delta": text[i:i + chunk], "logprobs": []}
        yield {"type": "response.output_text.done", **common, "text": text, "logprobs": []}
        yield {"type": "response.content_part.done", **common, "part": part}
    elif item.get("type") == "function_call":
        args = item.get("arguments", "")
        for i in range(0, len(args), 8):
            yield {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index,
                   "delta": args[i:i + 8]}
        yield {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
               "arguments": args}
    yield {"type": "response.output_item.done", "output_index": index, "item": item}


# -- the service and its connections ------------------------------------------------------------------------------
@dataclass
class Refusal:
    """A handshake the upstream refuses: the HTTP status, headers and JSON body it answers with."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Model:
    """The upstream service: stored responses (per credential), token counts, and the scripted model."""

    def __init__(self, *, seed: int = 0, reply: Callable[[list[Any], dict[str, Any]], list[Item]] | None = None) -> None:
        self.stored: dict[tuple[str, str], list[Any]] = {}  # (owner, response id) -> full context
        self.tokens: dict[str, int] = {}
        self.reply = reply or self.scripted_reply
        self.reply_text: Callable[[str], str] = lambda text: "reply to: " + text[:80]
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)
        self._conns = itertools.count(1)
        self._seed = f"{seed:04x}"
        self._refusals: deque[Refusal] = deque()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{self._seed}{next(self._ids):08x}"

    def connect(self, owner: str = "") -> "Connection":
        """A new connection for the credentials ``owner`` names."""
        return Connection(self, next(self._conns), owner)

    # -- handshakes ---------------------------------------------------------------------------------------------
    def refuse_next(self, count: int, status: int = 503, body: bytes | None = None,
                    headers: list[tuple[str, str]] | None = None) -> None:
        for _ in range(count):
            self._refusals.append(refusal(status, body, headers))

    def handshake(self) -> Refusal | None:
        """How the next handshake is answered: None accepts it."""
        return self._refusals.popleft() if self._refusals else None

    # -- the model ----------------------------------------------------------------------------------------------
    def scripted_reply(self, context: list[Any], request: dict[str, Any]) -> list[Item]:
        """A deterministic stand-in for the model."""
        out: list[Item] = []
        if "reasoning.encrypted_content" in (request.get("include") or []):
            out.append({"type": "reasoning", "id": self.new_id("rs"), "summary": [],
                        "encrypted_content": "enc_" + self.new_id("x")})
        last = context[-1] if context else {}
        if isinstance(last, dict) and last.get("type") in OUTPUT_CALLS:
            outputs = []
            for item in reversed(context):
                if not (isinstance(item, dict) and item.get("type") in OUTPUT_CALLS):
                    break
                outputs.append(str(item.get("output")))
            out.append(self.message("tool said: " + "; ".join(reversed(outputs))))
            return out
        text = text_of(last) if isinstance(last, dict) and last.get("type", "message") == "message" else ""
        if "LONG" in text:  # two messages: a max_output_tokens below 32 cuts it after the first (incomplete)
            out += [self.message("first part of a long answer"), self.message("second part")]
        elif "TOOL2" in text:
            out += [self.tool_call("echo a"), self.tool_call("echo b")]
        elif "TOOL" in text:
            out.append(self.tool_call("ls" if " ls" in text else "echo a"))
        else:
            out.append(self.message(self.reply_text(text)))
        return out

    def tool_call(self, cmd: str) -> Item:
        return {"type": "function_call", "id": self.new_id("fc"), "call_id": f"call_{next(self._calls)}",
                "name": "exec_command", "arguments": json.dumps({"cmd": cmd}), "status": "completed"}

    def message(self, text: str) -> Item:
        return {"type": "message", "id": self.new_id("msg"), "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def refusal(status: int, body: bytes | None = None, headers: list[tuple[str, str]] | None = None) -> Refusal:
    """The upstream's answer to a refused handshake: its JSON error body, and Retry-After on a 429."""
    if body is None:
        type_, code, message = REFUSALS.get(status, ("server_error", None, "The server is overloaded or not ready."))
        body = json.dumps({"error": {"type": type_, "code": code, "message": message, "param": None}}).encode()
    if headers is None:
        headers = [("Retry-After", "7")] if status == 429 else []
    return Refusal(status, [("Content-Type", "application/json"), *headers], body)


@dataclass(eq=False)
class Job:
    """One response being generated on a lane."""

    rid: str
    request: dict[str, Any]
    lane: str | None
    context: list[Any]  # the whole input
    output: list[Item]  # what it will say
    previous: str | None
    store: bool
    usage_in: int
    buffer: deque[Event] = field(default_factory=deque)  # events planned, not yet sent
    stage: int = -1  # -1: not started; n: output item n is next; None once its terminal event is planned
    ended: bool = False  # its terminal event is planned
    then: "Job | None" = None  # the automatic successor that follows its terminal event
    seq: Iterator[int] = field(default_factory=itertools.count)  # sequence numbers count per response
    done: list[Item] = field(default_factory=list)  # output items finished so far
    steers: list[tuple[str, list[Any]]] = field(default_factory=list)  # accepted: (steer id, input)
    status: str = "queued"


@dataclass(eq=False)
class LaneState:
    active: Job | None = None
    waiting: deque[Job] = field(default_factory=deque)


class Connection:
    """One WebSocket connection to the upstream: its cache, its lanes, and what it has to send."""

    def __init__(self, model: Model, cid: int, owner: str) -> None:
        self.model = model
        self.id = cid
        self.owner = owner
        self.cache: dict[str | None, tuple[str, list[Any]]] = {}  # lane -> its last response (id, full context)
        self.lanes: dict[str | None, LaneState] = {}
        # Answers to client messages in the order they were read (a create's response.created, an error, a steer's
        # verdict), sent before any lane's next event.
        self.immediate: deque[Event] = deque()
        self.pending_steers: dict[str, list[tuple[str, list[Any]]]] = {}  # parent id -> queued steering input
        self.responses = 0  # responses finished (completed or incomplete)
        self.received: list[Any] = []
        self._seq = itertools.count()

    # -- what the client sends ------------------------------------------------------------------------------------
    def receive(self, message: str | bytes) -> None:
        """Take one client message; what the upstream answers becomes available through :meth:`next_event`."""
        if isinstance(message, bytes):
            self.received.append({"_binary": len(message)})
            self._answer(RequestFailed(400, None, "Binary frames are not supported.", None).event)
            return
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):
            self.received.append({"_raw": message})
            self._answer(RequestFailed(400, None, "Invalid JSON.", None).event)
            return
        self.received.append(obj)
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "response.create":
            self._create(obj)
        elif kind == "response.steer":
            self._steer(obj)
        elif kind == "response.processed":
            return
        else:
            self._answer(RequestFailed(400, "unknown_event_type", f"Unknown event type: {kind!r}.", "type").event)

    def _create(self, req: dict[str, Any]) -> None:
        lane = req.get("stream_id")
        if lane is not None and not isinstance(lane, str):
            self._answer(RequestFailed(400, "invalid_type", "Invalid type for 'stream_id'.", "stream_id").event)
            return
        state = self.lanes.setdefault(lane, LaneState())
        busy = state.active is not None
        if busy and lane is None:
            self._answer(RequestFailed(400, "conversation_already_has_active_response",
                                       "Another response is in progress on this connection. Wait for it to finish, "
                                       "or send it on another stream_id.", None).event)
            return
        job = Job(self.model.new_id("resp"), req, lane, [], [], None, req.get("store", True) is not False, 0)
        if busy:
            state.waiting.append(job)
            self._answer(self._stamp({"type": "response.queued",
                                      "response": response_object(job.rid, req, "queued", [])}, lane))
            return
        self._start(state, job)

    def _start(self, state: LaneState, job: Job) -> None:
        """A job begins (at once, or when its lane is free): validated now, against the cache as it is now."""
        req = job.request
        previous = req.get("previous_response_id")
        try:
            items, context = self._resolve(req, job.store, take_steers=True)
        except RequestFailed as failure:
            if req.get("previous_response_id"):
                self._evict(req["previous_response_id"])  # after an error the response it named is forgotten
            self._answer(self._stamp(failure.event, job.lane))
            self._next(state)
            return
        job.previous = previous or None
        job.context = context
        generate = req.get("generate", True) is not False
        job.output = self.model.reply(context, req) if generate else []
        job.usage_in = (self.model.tokens.get(previous, 0) if previous else 0) + len(json.dumps(items)) // 4
        job.status = "in_progress"
        state.active = job
        # Its first events are the answer to the create: in order with the answers to the messages around it.
        self._advance(job)
        for _ in range(2):  # response.created, response.in_progress
            self.immediate.append(job.buffer.popleft())

    def context_of(self, req: dict[str, Any], store: bool) -> list[Any]:
        """The whole input the upstream sees for a create (raises RequestFailed as the upstream answers): for a
        recorded answer, which skips the model but meets the same checks."""
        return self._resolve(req, store)[1]

    def _resolve(self, req: dict[str, Any], store: bool, take_steers: bool = False) -> tuple[list[Any], list[Any]]:
        """(the create's input items, the whole context): the previous response's context and the items, checked as
        the upstream checks them. ``take_steers``: steering input queued for that response goes first."""
        items = list(input_items(req.get("input", [])))
        previous = req.get("previous_response_id")
        base: list[Any] = []
        if previous:
            found = self._lookup(previous)
            if found is None:
                raise RequestFailed(400, "previous_response_not_found",
                                    f"Previous response with id '{previous}' not found.", "previous_response_id")
            base = found
            if take_steers:
                queued = self.pending_steers.pop(previous, [])
                items = [i for _, steer in queued for i in steer] + items  # queued steering input goes first
        context = base + items
        validate(context, store)
        return items, context

    def remember(self, rid: str, req: dict[str, Any], full: list[Any]) -> None:
        """A response made outside the model (a recorded answer) is this connection's last on its lane."""
        lane = req.get("stream_id") if isinstance(req.get("stream_id"), str) else None
        self.cache[lane] = (rid, full)
        if req.get("store", True) is not False:
            self.model.stored[(self.owner, rid)] = full
        self.responses += 1

    def _steer(self, req: dict[str, Any]) -> None:
        target = req.get("previous_response_id")
        try:
            items = input_items(req.get("input"))
            if not items or any(not isinstance(i, dict) or i.get("role") != "user" or
                                i.get("type", "message") != "message" for i in items):
                raise RequestFailed(400, "invalid_input", "Steering accepts only user messages.", "input")
        except RequestFailed:
            self._answer(self._steer_failed(target, req.get("input"), "invalid_input",
                                            "Steering accepts only messages with the user role.", None))
            return
        for lane, state in self.lanes.items():
            job = state.active
            if job is not None and job.rid == target and not job.ended:
                steer_id = self.model.new_id("steer")
                job.steers.append((steer_id, items))
                self._answer(self._stamp({"type": "response.steer.accepted",
                                          "steer": {"id": steer_id, "previous_response_id": target}}, lane))
                return
        done = any(cached[0] == target for cached in self.cache.values())
        self._answer(self._steer_failed(
            target, req.get("input"), "response_already_completed" if done else "response_not_found",
            "The response completed and no longer accepts steering input." if done else
            "The target response is not available on this connection.", None))

    def _steer_failed(self, target: Any, value: Any, code: str, message: str, lane: str | None,
                      steer_id: str | None = None) -> Event:
        steer: dict[str, Any] = {"previous_response_id": target if isinstance(target, str) else "",
                                 "input": value if isinstance(value, (str, list)) else ""}
        if steer_id is not None:
            steer["id"] = steer_id
        return self._stamp({"type": "response.steer.failed", "steer": steer,
                            "error": {"type": "invalid_request_error", "code": code, "message": message}}, lane)

    # -- what the upstream sends ------------------------------------------------------------------------------------
    def ready(self) -> list[str | None]:
        """Lanes with an event to send now (the answers to messages go first, whatever lane is asked for)."""
        return [lane for lane, state in self.lanes.items() if state.active is not None]

    def next_event(self, lane: str | None = None) -> Event | None:
        """The next event to send: an answer to a message if one is due, else the next event of ``lane``'s
        response (None: nothing to send)."""
        if self.immediate:
            return self.immediate.popleft()
        state = self.lanes.get(lane)
        job = state.active if state is not None else None
        if job is None:
            return None
        if not job.buffer:
            self._advance(job)
        event = job.buffer.popleft()
        if job.ended and event.get("type") in TERMINAL_TYPES:
            # Its terminal event: the lane goes on with what follows (a successor, or the next create), and what
            # the upstream says after it about steering (pending, failed) comes next, in order.
            self.immediate.extend(job.buffer)
            job.buffer.clear()
            state.active = job.then  # type: ignore[union-attr]
            if job.then is None:
                self._next(state)  # type: ignore[arg-type]
        return event

    def drain(self) -> list[Event]:
        """Everything there is to send, lanes interleaved one event at a time (for tests that need no choice)."""
        out: list[Event] = []
        while True:
            if self.immediate:
                out.append(self.immediate.popleft())
                continue
            lanes = self.ready()
            if not lanes:
                return out
            for lane in lanes:
                event = self.next_event(lane)
                if event is not None:
                    out.append(event)

    def limit_reached(self) -> Event:
        """The connection reached its age limit: the error it ends with (the caller closes it after)."""
        return dict(CONNECTION_LIMIT_EVENT)

    # -- inside ------------------------------------------------------------------------------------------------
    def _advance(self, job: Job) -> None:
        """Plan the next events of ``job``: its start, its next output item, or its end; steering is applied at an
        item boundary, max_output_tokens after the first item."""
        lane, req = job.lane, job.request
        if job.stage == -1:
            base = response_object(job.rid, req, "in_progress", [], previous=job.previous)
            job.buffer.append(self._stamp({"type": "response.created", "response": base}, lane, job))
            job.buffer.append(self._stamp({"type": "response.in_progress", "response": base}, lane, job))
            job.stage = 0
            if _wants_failure(job.context):
                self._end(job, "failed", None)
            return
        index = job.stage
        limit = req.get("max_output_tokens")
        if index < len(job.output) and job.steers and job.done:
            self._end(job, "incomplete", "steered")
        elif index < len(job.output) and isinstance(limit, int) and job.done and limit < 16 * (index + 1):
            self._end(job, "incomplete", "max_output_tokens")
        elif index < len(job.output):
            item = job.output[index]
            job.buffer.extend(self._stamp(e, lane, job) for e in item_events(index, item))
            job.done.append(item)
            job.stage = index + 1
        else:
            self._end(job, "completed", None)

    def _end(self, job: Job, status: str, reason: str | None) -> None:
        """Plan the terminal event, and what follows it: queued steering input, or an automatic successor."""
        output = list(job.done)
        usage = usage_of(job.usage_in, len(json.dumps(output)) // 4)
        error = {"code": "server_error", "message": "The model failed to generate a response."} \
            if status == "failed" else None
        final = response_object(job.rid, job.request, status, output, usage=usage, previous=job.previous,
                                incomplete=reason, error=error)
        full = job.context + output
        if status == "failed":
            self.cache.pop(job.lane, None)  # the lane's last response failed: nothing to continue on it
        else:
            self.cache[job.lane] = (job.rid, full)
            if job.store:
                self.model.stored[(self.owner, job.rid)] = full
            self.responses += 1
        self.model.tokens[job.rid] = usage["total_tokens"]
        job.ended, job.status = True, status
        job.buffer.append(self._stamp({"type": f"response.{status}", "response": final}, job.lane, job))
        steers, job.steers = job.steers, []
        if not steers:
            return
        pending = [i for i in output if i.get("type") in NEEDS_OUTPUT]
        if status == "failed":
            for steer_id, items in steers:
                job.buffer.append(self._steer_failed(job.rid, items, "successor_creation_failed",
                                                     "The successor response could not be created.", job.lane,
                                                     steer_id))
            return
        if status == "completed" and pending:
            # It waits for client tool output: the steering input stays queued for the continuation.
            self.pending_steers.setdefault(job.rid, []).extend(steers)
            for steer_id, _ in steers:
                job.buffer.append(self._stamp({
                    "type": "response.steer.pending", "reason": "waiting_for_required_input",
                    "required_input": [{"type": "function_call_output", "call_id": i["call_id"],
                                        "name": i.get("name", "")} for i in pending],
                    "steer": {"id": steer_id, "previous_response_id": job.rid}}, job.lane, job))
            return
        # The automatic successor: it continues this response with the steered input and inherits its settings.
        items = [i for _, steer in steers for i in steer]
        settings = {k: v for k, v in job.request.items() if k not in ("input", "previous_response_id", "type")}
        successor = Job(self.model.new_id("resp"), settings, job.lane, full + items, [], job.rid, job.store,
                        usage["total_tokens"] + len(json.dumps(items)) // 4, status="in_progress")
        successor.output = self.model.reply(successor.context, settings)
        job.then = successor

    def _next(self, state: LaneState) -> None:
        if state.active is None and state.waiting:
            self._start(state, state.waiting.popleft())

    def _lookup(self, previous: Any) -> list[Any] | None:
        if not isinstance(previous, str):
            raise RequestFailed(400, "invalid_type", "Invalid type for 'previous_response_id': expected a string.",
                                "previous_response_id")
        for rid, context in self.cache.values():
            if rid == previous:
                return context
        return self.model.stored.get((self.owner, previous))

    def _evict(self, previous: str) -> None:
        for lane, (rid, _) in list(self.cache.items()):
            if rid == previous:
                del self.cache[lane]

    def _answer(self, event: Event) -> None:
        if "sequence_number" not in event:
            event = dict(event, sequence_number=next(self._seq))
        self.immediate.append(event)

    def _stamp(self, event: Event, lane: str | None, job: Job | None = None) -> Event:
        event = dict(event, sequence_number=next(job.seq if job is not None else self._seq))
        if lane is not None:
            event["stream_id"] = lane
        return event
