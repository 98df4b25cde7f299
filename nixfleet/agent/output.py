"""The tail of a switch's output, as a failing report carries it (docs/agent.md).

Bounded (the last OUTPUT_MAX bytes of UTF-8) and safe to show: every control
character but newline and tab is escaped (`\\x1b`, `\\x0d`, …), so a colourised or
hostile log cannot drive the operator's terminal nor break the report's schema.
"""

from __future__ import annotations

OUTPUT_MAX = 64 * 1024
_KEEP = {"\n", "\t"}


def escape(text: str) -> str:
    """Control characters (C0, DEL, C1, lone surrogates) as Python-style escapes."""
    out = []
    for c in text:
        code = ord(c)
        if c in _KEEP or (c.isprintable() and not 0xD800 <= code <= 0xDFFF) or c == " ":
            out.append(c)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def tail(text: str, limit: int = OUTPUT_MAX) -> str:
    """The escaped end of `text`, at most `limit` bytes of UTF-8, cut at a line start."""
    text = escape(text.rstrip("\n"))
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    cut = data[-limit:].decode("utf-8", "ignore")
    newline = cut.find("\n")
    if 0 <= newline < len(cut) - 1:
        cut = cut[newline + 1 :]
    return cut
