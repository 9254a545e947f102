"""Mutated control documents and frame headers: the agent answers every one and keeps
serving (run with the sanitizer build to catch memory errors, see conftest.py)."""

from __future__ import annotations

import json
import random
import struct

import pytest

from microagent.vm.protocol import FrameType, encode
from tests.protocol.driver import Session, StreamState

SEEDS = [
    {"op": "exec", "argv": ["/nonexistent/\u00e9\\\"x", "a"], "env": ["A=\U0001F600"],
     "cwd": "/", "user": "", "tty": None, "stdin": False, "timeout_ms": 0},
    {"op": "get", "path": "/nonexistent/file"},
    {"op": "info", "nested": [[{"a": [1, 2.5e3, -0, True, False, None]}], {"b": {}}]},
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        pos = rng.randrange(len(buf) + 1)
        if choice < 0.3 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif choice < 0.6:
            buf.insert(pos, rng.choice(b'{}[]",:\\u0123456789eE+-.tfnrl \x00\xff'))
        elif choice < 0.8 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        else:
            buf = buf[:pos]
    return bytes(buf)


@pytest.mark.timeout(300)
def test_mutated_open_documents(session: Session) -> None:
    rng = random.Random(1234)
    seeds = [json.dumps(seed).encode() for seed in SEEDS] + \
        [json.dumps(seed, ensure_ascii=False).encode() for seed in SEEDS] + \
        [rb'{"op":"exec","argv":["\ud83d\ude00\udcff\u0041\n"],"tty":{"rows":1,"cols":2}}']
    for _ in range(1500):
        payload = mutate(rng, rng.choice(seeds))
        stream = session.next_id
        session.next_id += 2
        state = StreamState(stream)
        session.streams[stream] = state
        session.send(encode(FrameType.OPEN, stream, payload))
        session.pump_until(lambda state=state: state.done, what=f"an answer to {payload!r}")
    state = session.run(["echo", "alive"])
    assert bytes(state.stdout) == b"alive\n"


@pytest.mark.timeout(120)
def test_random_frames_then_hello(session: Session) -> None:
    """Whole frames with random types, flags, streams and payloads: whatever state they
    leave the connection in, a HELLO brings it back."""
    rng = random.Random(99)
    types = [t.value for t in FrameType if t != FrameType.HELLO] + [0x00, 0x04, 0x7F, 0xFF]
    for _ in range(300):
        for _ in range(rng.randint(1, 5)):
            payload = rng.randbytes(rng.randint(0, 200)) if rng.random() < 0.5 else \
                mutate(rng, b'{"signal": 15, "rows": 1, "cols": 2}')
            flags = 0 if rng.random() < 0.8 else rng.randrange(256)
            reserved = 0 if rng.random() < 0.9 else rng.randrange(65536)
            header = struct.pack(">IBBHI", len(payload), rng.choice(types), flags, reserved,
                                 rng.choice([0, 1, 2, 3, 7, 2**32 - 1]))
            session.send(header + payload)
        session.read_frames(0.01)
        session.hello()
        session.next_id = 1
        session.streams.clear()
        session.control.clear()
    state = session.run(["echo", "alive"])
    assert bytes(state.stdout) == b"alive\n"
