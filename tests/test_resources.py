"""replayguard.proxy.resources, directly: the open-files limit and the once-per-burst report."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource

from replayguard.proxy import resources


def test_soft_limit_is_raised_to_the_hard_one(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 8192))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert resources.raise_open_files_limit() == (1024, 8192) and calls == [(8192, 8192)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (8192, 8192))
    assert resources.raise_open_files_limit() is None


def test_exhaustion_is_reported_once_per_burst_and_other_errors_pass_on(caplog):
    loop = asyncio.new_event_loop()
    passed_on = []
    loop.set_exception_handler(lambda lp, context: passed_on.append(context))
    now = [0.0]
    alarm = resources.DescriptorAlarm(loop, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="replayguard.proxy.resources")
    for _ in range(500):  # an accept loop failing over and over
        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                     "exception": OSError(errno.EMFILE, "Too many open files")})
        now[0] += 0.001
    loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
    assert [r.getMessage() for r in caplog.records if "out of file descriptors" in r.getMessage()] == [
        "replayguard: out of file descriptors (Too many open files): new connections wait or are refused until some "
        "close; raise the limit (ulimit -n) for more concurrent sessions"]
    assert len(passed_on) == 1 and isinstance(passed_on[0]["exception"], ValueError)
    now[0] += resources.BURST_QUIET + 1
    alarm.note(OSError(errno.EMFILE, "Too many open files"))  # a new burst, reported again
    assert alarm.bursts == 2 and "after 500 failed" in caplog.records[-2].getMessage()
    alarm.uninstall()
    assert loop.get_exception_handler() is not alarm
    loop.close()


def test_asyncios_accept_retry_on_a_closed_server_is_not_reported_after_a_burst(caplog):
    """After running out of descriptors asyncio retries accepting a second later; when the proxy stopped meanwhile
    the retry fails on fd -1: no traceback for that (anything else still goes to the handler it wraps)."""
    import asyncio

    loop = asyncio.new_event_loop()
    seen: list[dict] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    alarm = resources.DescriptorAlarm(loop)

    def _start_serving() -> None:  # named as asyncio's own retry
        raise ValueError("Invalid file descriptor: -1")

    def raised(fn) -> BaseException:
        try:
            fn()
        except BaseException as e:
            return e
        raise AssertionError("did not raise")

    retry = {"message": "Exception in callback", "exception": raised(_start_serving)}
    alarm(loop, retry)
    assert seen == [retry]  # no burst yet: not ours to judge
    alarm.note(OSError(errno.EMFILE, "Too many open files"))
    alarm(loop, retry)
    other = {"message": "Exception in callback", "exception": raised(lambda: (_ for _ in ()).throw(ValueError("x")))}
    alarm(loop, other)
    assert seen == [retry, other]  # the stale retry after the burst is swallowed; the rest passes on
    alarm.uninstall()
    loop.close()
