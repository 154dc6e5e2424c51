"""The chain trace file: session events become records (:mod:`replayguard.core.records`), appended to a JSON Lines
file that only the user can read, every line scrubbed of the session's secrets."""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..core import events as ev
from ..core.records import Bodies, record_of
from ..core.redact import scrub

log = logging.getLogger(__name__)


def _default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


class TraceWriter:
    """Appends records to a JSON Lines file that only the user can read.

    Each record is one ``write()`` of a whole line on an O_APPEND descriptor, so records from many sessions never
    interleave. If a previous run died mid-line, the file is first ended with a newline, so the broken line stays
    one line that readers skip.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = self.resolve(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._fd, 0o600)  # an existing file keeps no wider permissions than ours
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
        self.records = 0
        self.failed: str | None = None  # the first write error (the trace goes on without the record)

    @staticmethod
    def resolve(path: str | Path) -> Path:
        """A directory (existing, or named with a trailing slash) gets one file per run."""
        p = Path(path).expanduser()
        if p.is_dir() or str(path).endswith(("/", os.sep)):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return p / f"replayguard-{stamp}-{os.getpid()}.jsonl"
        return p

    def write(self, session: str, event: str, secrets: Iterable[str] = (), **fields: Any) -> None:
        record = {"ts": round(time.time(), 6), "session": session, "event": event, **fields}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=_default)
        line = scrub(line, secrets)
        os.write(self._fd, (line + "\n").encode("utf-8", "replace"))
        self.records += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TraceFile:
    """The trace file every session writes to. When replayguard_trace changes, the new file is opened before the
    old one is closed and the sessions write wherever this points, so live sessions move to the new file and no
    record is lost between the two."""

    def __init__(self, writer: TraceWriter | None = None) -> None:
        self.writer = writer

    def open(self, path: str | Path) -> TraceWriter:
        """Trace to ``path`` from now on (raises OSError and keeps the current file when it cannot be opened)."""
        writer = TraceWriter(path)
        old, self.writer = self.writer, writer
        if old is not None:
            old.close()
        return writer

    def close(self) -> None:
        old, self.writer = self.writer, None
        if old is not None:
            old.close()


class SessionTrace:
    """One session's trace: a listener of its events that writes them as records, stamped with the session id and
    scrubbed of the session's own secrets (nothing while tracing is off)."""

    def __init__(self, file: TraceFile, session: str, secrets: Iterable[str] = (),
                 bodies: Bodies = Bodies.SUMMARY) -> None:
        self.file = file
        self.session = session
        self.bodies = bodies
        self.secrets = list(secrets)  # the session's credential values (core.redact.Credentials.secrets)

    def record(self, event: str, **fields: Any) -> None:
        writer = self.file.writer
        if writer is None:
            return
        try:
            writer.write(self.session, event, self.secrets, **fields)
        except OSError as e:  # a full disk must not take the session down; the log says it once
            if writer.failed is None:
                writer.failed = str(e)
                log.warning("replayguard: cannot write trace %s: %s (records are being lost)", writer.path, e)

    def __call__(self, event: ev.Event) -> None:
        if self.file.writer is None:
            return
        record = record_of(event, self.bodies)
        if record is not None:
            self.record(record[0], **record[1])
