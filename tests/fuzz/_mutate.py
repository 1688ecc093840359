"""Structure-aware inputs: real encodings with a few bytes (or characters) flipped, set to DER's
interesting values, inserted, deleted, duplicated, spliced from another seed, or cut off."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

# Values that change how a DER reader frames things: short/long length forms, tags, booleans.
_INTERESTING = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x30, 0x7F, 0x80, 0x81, 0x82, 0x83,
                0x84, 0x85, 0xA0, 0xA3, 0xFF)  # fmt: skip


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: Sequence[bytes], max_edits: int = 4) -> bytes:
    """One of ``seeds`` with 1..max_edits random edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "dup", "splice", "cut")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from(_INTERESTING) | st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, max(len(other) - 1, 0)))
            data[at : at + draw(st.integers(0, 64))] = other[
                start : start + draw(st.integers(1, 64))
            ]
        elif op == "cut":
            del data[at:]
    return bytes(data)


@st.composite
def mutated_text(draw: st.DrawFn, seeds: Sequence[str], alphabet: str, max_edits: int = 3) -> str:
    """One of ``seeds`` with characters replaced, inserted or deleted, from ``alphabet``."""
    chars = list(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(("set", "insert", "delete", "cut")))
        at = draw(st.integers(0, max(len(chars) - 1, 0)))
        if op == "set" and chars:
            chars[at] = draw(st.sampled_from(alphabet))
        elif op == "insert":
            chars[at:at] = draw(st.lists(st.sampled_from(alphabet), min_size=1, max_size=3))
        elif op == "delete":
            del chars[at : at + draw(st.integers(1, 4))]
        elif op == "cut":
            del chars[at:]
    return "".join(chars)
