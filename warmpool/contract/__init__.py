"""What the parts of warmpool agree on, below all of them: the Redis keys, the request
and notification payloads, the watch list, the dead-letter shape, and the Redis client
and lock. The pool's Redis registry, the relays and the controller import it; it imports
none of them."""
