"""Per-range checksums of a resident buffer: what a peer's bytes are checked against.

xxh3_128 hashes at memory speed (several GB/s a core), a small cost beside the copy it
guards; a 128-bit digest makes an accidental match of a corrupted range impossible in
practice. It is not a cryptographic hash: it guards against faults (a torn read, a
flipped bit, an evicted and reused arena chunk), not against an attacker who can write
the seeds in Redis, who is trusted as much as Redis is (docs/security.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

from warmpool.contract.seeds import ranges

if TYPE_CHECKING:
    import torch


def range_sum(buffer: torch.Tensor, offset: int, length: int) -> str:
    """xxh3_128 of ``buffer[offset:offset+length]`` (a flat uint8 tensor), as hex."""
    view = buffer[offset:offset + length]
    if view.device.type != "cpu":  # a worker's device buffer: hashed from a host copy
        view = view.to("cpu")
    return xxhash.xxh3_128_hexdigest(view.numpy().data)


def range_sums(buffer: torch.Tensor, total_bytes: int, range_bytes: int) -> tuple[str, ...]:
    """The checksum of each range of the first ``total_bytes`` of ``buffer``."""
    return tuple(range_sum(buffer, off, n) for off, n in ranges(total_bytes, range_bytes))
