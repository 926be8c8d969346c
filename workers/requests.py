"""What arrives on a worker connection: load requests, replies, and the connection's
own state (its leases, group ranks it has prepared, exports it has begun).

A load request is checked as untrusted input when it is decoded: the layout must fit its
buffer and agree with the content hash, the loader must be one we know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from warmpool.config import StreamerOptions
from warmpool.errors import ProtocolError, WarmpoolError
from warmpool.loading.loaders import LOADERS
from warmpool.model.uri import parse_uri
from warmpool.pool.layout import Layout
from warmpool.pool.refs import looks_like_hash
from warmpool.workers.protocol import AsyncChannel, Message
from warmpool.workers.residents import DeviceResident


@dataclass(frozen=True)
class LoadRequest:
    uri: str
    content_hash: str
    layout: Layout
    loader: str = "auto"
    options: StreamerOptions = StreamerOptions()
    pinned: bool = False

    @classmethod
    def from_message(cls, msg: Message, defaults: StreamerOptions) -> LoadRequest:
        try:
            layout = Layout.from_json(msg["layout"])
            uri = str(parse_uri(str(msg["uri"])))
            content_hash = str(msg["content_hash"])
        except WarmpoolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed load request: {exc!r}") from None
        if not looks_like_hash(content_hash) or layout.content_hash != content_hash:
            raise ProtocolError("load request: content_hash and layout disagree")
        loader = str(msg.get("loader", "auto"))
        if loader not in LOADERS:
            raise ProtocolError(f"unknown loader {loader!r}")
        streamer = msg.get("streamer") or {}
        options = replace(defaults, **{k: streamer[k] for k in ("concurrency", "memory_limit")
                                       if streamer.get(k) is not None})
        return cls(uri, content_hash, layout, loader, options, bool(msg.get("pinned", False)))

    def to_message(self) -> Message:
        return {"uri": self.uri, "content_hash": self.content_hash,
                "layout": self.layout.to_json(), "loader": self.loader, "pinned": self.pinned,
                "streamer": {"concurrency": self.options.concurrency,
                             "memory_limit": self.options.memory_limit}}


@dataclass
class Reply:
    message: Message
    fds: list[int] = field(default_factory=list)
    after: Callable[[], Awaitable[None]] | None = None  # runs once the reply is sent


@dataclass(eq=False)
class Connection:
    id: int
    channel: AsyncChannel
    pid: int
    holder: str = ""
    leases: set[str] = field(default_factory=set)  # content hashes
    #: group ranks prepared by this connection's coordinator, awaiting group_stream;
    #: discarded if the coordinator goes away first.
    prepared: dict[str, tuple[DeviceResident, LoadRequest]] = field(default_factory=dict)
    #: engine-layout exports begun on this connection, awaiting export_commit; freed
    #: (and recorded failed) if the exporter goes away first.
    exports: dict[str, DeviceResident] = field(default_factory=dict)
