"""Output bounded for a model's context: the head and the tail kept, the middle counted.

A command's stream goes into a :class:`BoundedSink` as it arrives, so a command that
prints gigabytes costs the server no more than its bound. What is shown is the first
quarter of the bound and the last three quarters (errors and summaries come last), cut
at UTF-8 character boundaries, with a marker in between that says how much was left out
and, for a background process, where the guest keeps the whole output (its files under
``/run/microagent/proc/ID/``) so the model can grep or read it there.
"""

from __future__ import annotations

DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024
MIN_OUTPUT_BYTES = 256


class BoundedSink:
    """A stream's head and rolling tail (``limit`` bytes kept in all) and its length."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head_limit = limit // 4
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_limit:  # trimmed now and then, not per write
                del self.tail[:-self.tail_limit]

    def skip(self, count: int) -> None:
        """``count`` bytes of the stream that are not there to keep (dropped by the guest,
        or not read): counted; the head ends, and the tail restarts after them."""
        if count > 0:
            self.total += count
            self.head_limit = len(self.head)
            self.tail.clear()

    @property
    def truncated(self) -> bool:
        """Whether bytes were left out."""
        return self.total > len(self.head) + min(len(self.tail), self.tail_limit)

    def text(self, where: str | None = None) -> str:
        """What is kept, as text (undecodable bytes replaced), with the marker; ``where``:
        the guest file that holds the whole stream."""
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        tail = bytes(self.tail[-self.tail_limit:])
        head = _cut_end(bytes(self.head))
        tail = _cut_start(tail)
        left_out = self.total - len(head) - len(tail)
        if where:
            how = (f"the whole output is in the guest at {where} (its first and last MiB "
                   "kept): grep or tail -c it with exec, or read_file it")
        else:
            how = ("narrow the command (grep, head, tail) or redirect its output to a file "
                   "and read_file it")
        marker = f"\n[... {left_out} bytes left out of {self.total}; {how} ...]\n"
        return head.decode("utf-8", "replace") + marker + tail.decode("utf-8", "replace")


def bound(data: bytes, limit: int) -> tuple[str, bool, int]:
    """``data`` bounded: the text, whether bytes were left out, its length."""
    sink = BoundedSink(limit)
    sink(data)
    return sink.text(), sink.truncated, sink.total


def _cut_end(data: bytes) -> bytes:
    """``data`` without a partial UTF-8 character at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else \
                3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return data if need <= back else data[:-back]
    return data


def _cut_start(data: bytes) -> bytes:
    """``data`` without the continuation bytes of a character cut at its start."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return data[skip:]
