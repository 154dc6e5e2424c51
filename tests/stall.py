"""A mitmproxy script for tests only: a client message containing STALL blocks the whole process (the event loop
replayguard runs on) for two seconds, as a huge message or a busy machine can."""

import time


def websocket_message(flow):
    message = flow.websocket.messages[-1]
    if message.from_client and b"STALL" in message.content:
        time.sleep(2.0)
