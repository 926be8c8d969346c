"""This process's NIXL agent: the data plane between nodes.

NIXL allows one agent per process (a second in the same process fails), and the one that
registers a node's warm segments must live where they are mapped: the controller, which
fills the host tier in-process. Its reader side (a fill from peers) and its seeder side
(:mod:`warmpool.loading.seeder`) therefore share the agent made here.

Transfers are one-sided READs: the seeder's code does nothing per read, so a reader is
bounded only by UCX (TCP at about 0.5 GB/s on the 2-core VM, shared memory between
processes on one machine at 2-3 GB/s, RDMA where the NIC has it). NIXL's calls block
briefly; they run in a thread so that the controller's loop keeps beating.

NIXL is the ``peers`` extra: nothing here imports it until an agent is made.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmpool.config import PeerSettings
from warmpool.errors import PeerError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_agent: PeerAgent | None = None


@dataclass(frozen=True)
class Region:
    """Registered memory on some node: where one seed's bytes start, and how many."""

    addr: int
    size: int
    device_id: int = 0
    kind: str = "DRAM"  # or "VRAM": a worker's device buffer (GPUDirect where present)

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.addr, "size": self.size, "device_id": self.device_id,
                "kind": self.kind}

    @classmethod
    def from_json(cls, data: Any) -> Region:
        if not isinstance(data, dict):
            raise ValueError("a region is a mapping")
        addr, size, dev, kind = (data.get("addr"), data.get("size"),
                                 data.get("device_id", 0), data.get("kind", "DRAM"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (addr, size, dev)) or kind not in ("DRAM", "VRAM"):
            raise ValueError("a region has integer addr, size, device_id and a kind")
        return cls(int(addr), int(size), int(dev), str(kind))  # type: ignore[arg-type]


def peer_agent(settings: PeerSettings, name: str) -> PeerAgent:
    """The process's agent, made at the first call (``name``: this node's agent name)."""
    global _agent
    with _lock:
        if _agent is None:
            _agent = PeerAgent(settings, name)
        return _agent


class PeerAgent:
    """One NIXL agent over UCX, held to the configured interface."""

    def __init__(self, settings: PeerSettings, name: str) -> None:
        if not settings.interface:
            raise PeerError("peers need an interface (peers: {interface: ...})")
        if settings.interface != "all":
            # UCX reads this when the agent starts: the addresses its metadata carries,
            # and so the only ones a peer can reach it on.
            os.environ["UCX_NET_DEVICES"] = settings.interface
        else:
            os.environ.pop("UCX_NET_DEVICES", None)
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as exc:
            raise PeerError("peers need NIXL: pip install 'warmpool[peers]'") from exc
        self.name = name
        self._nixl = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        self._calls = threading.Lock()  # NIXL's Python API is not documented thread-safe
        self._peers: dict[str, bytes] = {}  # remote agent -> the metadata it was loaded from

    def metadata(self) -> bytes:
        with self._calls:
            return bytes(self._nixl.get_agent_metadata())

    def register(self, tensor: torch.Tensor) -> Any:
        """Make ``tensor``'s memory readable by peers (the handle is for deregister)."""
        with self._calls:
            return self._nixl.register_memory(tensor)

    def deregister(self, handle: Any) -> None:
        with self._calls:
            self._nixl.deregister_memory(handle)

    def _remote(self, name: str, metadata: bytes) -> str:
        """The peer ``name`` as NIXL knows it; a node that restarted (the same name, new
        metadata) replaces its old self."""
        with self._calls:
            known = self._peers.get(name)
            if known == metadata:
                return name
            if known is not None:
                self._drop(name)
            added = self._nixl.add_remote_agent(metadata)
            added = added.decode() if isinstance(added, bytes) else str(added)
            if added != name:
                self._peers[added] = metadata
                self._drop(added)
                raise PeerError(f"the metadata published for {name} is agent {added}'s")
            self._peers[name] = metadata
            return name

    def forget(self, name: str) -> None:
        """Drop a peer (it died or failed): the next read connects anew."""
        with self._calls:
            self._drop(name)

    def _drop(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            try:
                self._nixl.remove_remote_agent(name)
            except Exception as exc:  # noqa: BLE001 - already gone is fine
                log.debug("removing peer agent %s: %s", name, exc)

    def read(self, name: str, metadata: bytes, local: list[torch.Tensor],
             remote: list[tuple[int, int]], region: Region, timeout_s: float) -> None:
        """READ each ``remote`` (offset, length) of ``region`` into the matching ``local``
        slice (of memory :meth:`register`\\ ed here). Blocks; :class:`PeerError` when the
        peer disconnects, fails the transfer or takes longer than ``timeout_s``."""
        try:
            peer = self._remote(name, metadata)
            with self._calls:
                src = self._nixl.get_xfer_descs(list(local))
                dst = self._nixl.get_xfer_descs(
                    [(region.addr + off, n, region.device_id) for off, n in remote],
                    region.kind)
                handle = self._nixl.initialize_xfer("READ", src, dst, peer)
                state = self._nixl.transfer(handle)
        except PeerError:
            raise
        except Exception as exc:  # noqa: BLE001 - NIXL's own errors: the peer failed
            self.forget(name)
            raise PeerError(f"peer {name}: the read did not start: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        try:
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise PeerError(f"peer {peer}: no answer in {timeout_s:g} s")
                time.sleep(0.0005)
                with self._calls:
                    state = self._nixl.check_xfer_state(handle)
        except PeerError:
            self.forget(name)
            raise
        except Exception as exc:  # noqa: BLE001 - a disconnect is raised here
            self.forget(name)
            raise PeerError(f"peer {peer}: the read failed: {exc}") from exc
        finally:
            try:
                with self._calls:
                    self._nixl.release_xfer_handle(handle)
            except Exception as exc:  # noqa: BLE001 - a handle still in flight
                log.debug("releasing a transfer from %s: %s", peer, exc)
        if state == "ERR":
            self.forget(name)
            raise PeerError(f"peer {peer}: the transfer failed")
