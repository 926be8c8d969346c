"""What a caller names a warm model by: its URI (or a local path), or its content hash.

One rule for every place that looks a model up — attach, evict, the controller's evict and
the GPU workers — so that the same text names the same model everywhere:

- text with ``://`` is a URI;
- 8 to 64 lowercase hex digits are a prefix of a content hash, *unless* a file or
  directory of that name exists here: then they are that path. Model directories are
  often named by a hash (the Hugging Face cache names its snapshot folders by commit),
  and a user who prefetched ``./3fa9c2d1e0`` must be able to attach it by the same
  name. A hash prefix that collides with such a name can still be given in full;
- anything else (``./x``, ``models/llama``, ``/abs``, ``~/m``) is a local path.

Only the process that reads the user's text applies the rule: what crosses to another
process (a worker, the controller) is the canonical form — a URI string or a hash prefix
— which :meth:`ModelRef.canonical` reads back without looking at any file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from warmpool.errors import InvalidURIError, NotWarmError
from warmpool.model.uri import parse_uri

HASH_PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")


def looks_like_hash(text: str) -> bool:
    """8 to 64 lowercase hex digits: a content hash or a prefix of one."""
    return HASH_PREFIX_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: ``text`` is a canonical URI string or a hash prefix."""

    text: str
    is_hash: bool

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """A user's reference, by the rule in the module docstring; raises
        :class:`NotWarmError` for text that is neither (nothing can be warm under it)."""
        if looks_like_hash(ref) and not os.path.lexists(ref):
            return cls(ref, True)
        try:
            return cls(str(parse_uri(ref)), False)
        except (InvalidURIError, OSError, RuntimeError, ValueError):
            raise NotWarmError(f"{ref!r} is neither a model URI nor a content hash") from None

    @classmethod
    def canonical(cls, text: str) -> ModelRef:
        """What another process already parsed (``str(ref)``): no file system lookup."""
        return cls(text, "://" not in text and looks_like_hash(text))

    def matches(self, uri: str, content_hash: str) -> bool:
        """Does the model at ``uri`` with ``content_hash`` answer to this reference?"""
        return content_hash.startswith(self.text) if self.is_hash else uri == self.text

    def __str__(self) -> str:
        return self.text
