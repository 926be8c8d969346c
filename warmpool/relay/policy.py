"""What one relay endpoint may pass on: the boundary between the network and Redis.

A relay is reachable by more people than Redis is (a bucket's queue is written by the
bucket, a webhook by whoever can reach its port), so it passes on less than the
controller would act on. Each endpoint has a :class:`RelayPolicy`:

- **Shapes.** A bucket's queue carries S3 notifications only; a webhook's ``POST /``
  carries notifications only; requests (deploy, evict, pin, unpin) come only through a
  webhook's ``POST /requests``, which has a token of its own and exists only when one
  is configured.
- **Uploads** under no watched prefix are dropped here (answered, counted, not put in
  the stream): the controller would drop them anyway, after a listing.
- **Requests** never carry ``force`` unless the operator allowed it, never ask for
  several nodes (``replicas``, ``nodes``, ``node_selector``: one request then warms the
  model on every node of the fleet) unless the operator allowed it, never name a local
  path unless the node allows local paths, and name a URI under an allowed prefix when
  prefixes are configured.
- **Keys and URIs** with control characters are refused: no store needs them, and they
  forge log lines and terminal output.

A refusal is a :class:`~warmpool.errors.BadEvent` with a stable reason, so it is
dead-lettered and counted like any payload the controller could not act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from warmpool.contract.notifications import NOTIFICATION_SHAPES, S3_SHAPES, Event, ObjectEvent
from warmpool.contract.requests import Request
from warmpool.contract.watchlist import Watchlist
from warmpool.errors import BadEvent, InvalidURIError
from warmpool.model.uri import ModelURI, parse_uri

#: Reasons a policy gives (beside the parser's), each with the HTTP status a webhook
#: answers: 403, the sender is authenticated but not allowed this.
POLICY_REASONS = ("force_refused", "fleet_refused", "local_path_refused", "prefix_refused",
                  "control_chars")


@dataclass(frozen=True)
class RelayPolicy:
    """``accept``: the payload shapes taken (:data:`~warmpool.contract.notifications.SHAPES`);
    ``watch``: the node's watch list (uploads outside it are dropped; empty drops all);
    ``allow_force``, ``allow_local_paths``, ``request_prefixes``: what requests may do."""

    accept: frozenset[str]
    watch: Watchlist = Watchlist()
    allow_force: bool = False
    allow_local_paths: bool = False
    request_prefixes: tuple[ModelURI, ...] = ()
    allow_fleet: bool = False

    @classmethod
    def notifications(cls, watch: Watchlist, *, s3_only: bool = False) -> RelayPolicy:
        return cls(S3_SHAPES if s3_only else NOTIFICATION_SHAPES, watch)

    @classmethod
    def requests(cls, *, allow_force: bool = False, allow_local_paths: bool = False,
                 request_prefixes: tuple[str, ...] = (),
                 allow_fleet: bool = False) -> RelayPolicy:
        try:
            prefixes = tuple(parse_uri(p) for p in request_prefixes)
        except InvalidURIError as exc:
            raise ValueError(f"request_prefixes: {exc}") from None
        return cls(frozenset({"request"}), Watchlist(), allow_force, allow_local_paths,
                   prefixes, allow_fleet)

    def watched(self, events: list[Event]) -> list[Event]:
        """The events to pass on; raises :class:`BadEvent` for a refused one.

        Uploads and removals outside the watch list are left out (the caller drops a
        payload left with none); requests are checked whole."""
        kept: list[Event] = []
        for event in events:
            if isinstance(event, Request):
                self._check_request(event)
                kept.append(event)
                continue
            assert isinstance(event, ObjectEvent)
            _no_control_chars(event.key, "object key")
            if self.watch.match(event.scheme, event.bucket, event.key) is not None:
                kept.append(event)
        return kept

    def _check_request(self, request: Request) -> None:
        text = str(request.uri)
        _no_control_chars(text, "uri")
        if request.force and not self.allow_force:
            raise BadEvent("force_refused", "this relay does not pass 'force' (the operator "
                           "allows it with allow_force: true)")
        if request.spread is not None and not self.allow_fleet:
            raise BadEvent("fleet_refused", "this relay does not pass requests for several "
                           "nodes (replicas, nodes, node_selector); the operator allows them "
                           "with allow_fleet: true")
        if request.uri.scheme == "file" and not self.allow_local_paths:
            raise BadEvent("local_path_refused", f"{_clip(text)} is a local path; this relay "
                           "passes only object-store URIs (allow_local_paths: true allows "
                           "them)")
        if self.request_prefixes and not any(
                p.contains(request.uri) for p in self.request_prefixes):
            raise BadEvent("prefix_refused", f"{_clip(text)} is under none of this relay's "
                           "request_prefixes")


def _no_control_chars(text: str, what: str) -> None:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise BadEvent("control_chars", f"the {what} {_clip(text)} holds control characters")


def _clip(text: str, limit: int = 120) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
