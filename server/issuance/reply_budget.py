"""How many items of an X.509-SVID batch one reply can carry.

An agent asks for up to 500 workload SVIDs at once; an entry may hold 100 DNS names of up to
253 bytes, each in its SVID, so 500 such SVIDs came to some 13 MB: past gRPC's 4 MiB message
limit, the whole reply failed, and the agent, asking for the same batch again, failed forever.
The node API answers the first items that fit and tells the agent how many it left for
another call. Sizes are estimated from the entries before signing (nothing is signed and
recorded only to be dropped) and generously, so the estimate stays above the real size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.datastore.records import Entry

# Far enough below gRPC's default 4 MiB limit that an estimate off by half still fits.
MAX_REPLY_BYTES = 2 * 1024 * 1024
# What a leaf holds besides its public key, SPIFFE ID and DNS names (names, validity, serial,
# extensions, the CA's signature: an RSA-4096 one is 512 bytes) and the item's framing.
LEAF_OVERHEAD = 2048
# A refused item: its entry id and a status message.
REFUSAL_BYTES = 1024


def item_bytes(entry: Entry | None, csr: bytes, chain_bytes: int) -> int:
    """A generous estimate of one item's share of the reply."""
    if entry is None:
        return REFUSAL_BYTES
    names = sum(len(name) + 8 for name in entry.dns_names)
    # The SPIFFE ID is in the leaf's SAN and in the item; the CSR's size bounds its key's.
    return LEAF_OVERHEAD + len(csr) + 2 * len(entry.spiffe_id) + names + chain_bytes


def answerable(
    requests: Sequence[tuple[str, bytes]],
    entry_of: Callable[[str], Entry | None],
    chain_bytes: int,
    budget: int = MAX_REPLY_BYTES,
) -> int:
    """How many of `requests` (entry id, CSR), from the first, fit in one reply: at least one
    (a single item is bounded by the entry's limits), so every call makes progress."""
    total = 0
    for count, (entry_id, csr) in enumerate(requests):
        total += len(entry_id) + item_bytes(entry_of(entry_id), csr, chain_bytes)
        if count and total > budget:
            return count
    return len(requests)
