"""What the addon keeps per flow: a flow the rules picked (until the router takes it), and a live session with the
view of it its flow keeps."""

from __future__ import annotations

from dataclasses import dataclass

from .flowview import FlowView
from .rules import Rules
from .session import Session


@dataclass(frozen=True, slots=True)
class Match:
    """A flow the rules picked: the rules in force then, and the name and path they matched."""

    rules: Rules
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class Live:
    """A live session and the view of it its flow keeps."""

    session: Session
    view: FlowView
