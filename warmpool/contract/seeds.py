"""What a node tells the fleet about a model it serves to peers: a *seed*.

A seed lives in Redis beside the node's heartbeat and expires with it
(``p:seed:<hash>:<node>``, listed in ``p:seeds:<hash>``): the agent that holds the bytes,
the registered region, the layout they follow, and a checksum per range recorded by the
node that read the bucket (or that checked every range it read from a peer). A reader
trusts a seed exactly as much as it trusts Redis: a wrong region or a wrong checksum
costs it a fallback to the bucket, never a published wrong byte, because every range is
checked against the seed's checksum before anything is published.

Pure data and its parsing, read as untrusted input; no NIXL here.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

#: xxh3_128 as 32 hex digits
_SUM = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,253}")
MAX_RANGES = 1 << 20  # 64 TiB in 64 MiB ranges: past this a seed is not a real one


@dataclass(frozen=True)
class Seed:
    """``node`` serves ``content_hash`` (``total_bytes``, laid out as ``layout_digest``
    says) from ``region`` of its agent ``agent``, in ranges of ``range_bytes``."""

    node: str
    agent: str
    content_hash: str
    total_bytes: int
    layout_digest: str
    region: dict[str, Any]  # warmpool.loading.nixl_agent.Region as JSON
    range_bytes: int
    sums: tuple[str, ...]
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "agent": self.agent,
                           "content_hash": self.content_hash,
                           "total_bytes": self.total_bytes,
                           "layout_digest": self.layout_digest, "region": self.region,
                           "range_bytes": self.range_bytes, "sums": list(self.sums),
                           "device": self.device})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Seed:
        """A seed read from Redis; ValueError when it is not a well-formed one."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a seed is a JSON object")
        node, agent, digest = data.get("node"), data.get("agent"), data.get("layout_digest")
        total, unit, sums = data.get("total_bytes"), data.get("range_bytes"), data.get("sums")
        content_hash, region = data.get("content_hash"), data.get("region")
        if not all(isinstance(v, str) and _NAME.fullmatch(v) for v in (node, agent)):
            raise ValueError("a seed names its node and agent")
        if not isinstance(content_hash, str) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                  content_hash):
            raise ValueError("a seed's content hash is 64 hex digits")
        if not isinstance(digest, str) or not _SUM.fullmatch(digest):
            raise ValueError("a seed's layout digest is 32 hex digits")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                   for v in (total, unit)):
            raise ValueError("a seed's sizes are positive integers")
        assert isinstance(total, int) and isinstance(unit, int)
        assert isinstance(node, str) and isinstance(agent, str)
        if (not isinstance(sums, list) or len(sums) != -(-total // unit)
                or len(sums) > MAX_RANGES
                or not all(isinstance(s, str) and _SUM.fullmatch(s) for s in sums)):
            raise ValueError("a seed has one xxh3_128 checksum per range")
        if not isinstance(region, dict):
            raise ValueError("a seed names its region")
        device = data.get("device", "cpu")
        if not isinstance(device, str) or not _NAME.fullmatch(device):
            raise ValueError("a seed's device is a device name")
        return cls(node, agent, content_hash, total, digest, dict(region), unit,
                   tuple(sums), device)


def encode_metadata(meta: bytes) -> str:
    return base64.b64encode(meta).decode("ascii")


def decode_metadata(text: bytes | str) -> bytes:
    return base64.b64decode(text, validate=True)


def ranges(total_bytes: int, range_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each range of a buffer of ``total_bytes``."""
    return [(off, min(range_bytes, total_bytes - off))
            for off in range(0, total_bytes, range_bytes)]
