"""Compile caches: what an engine compiles for a model, made once by the node's export and
used by every serving start (:mod:`.key` names one, :mod:`.store` keeps them,
:mod:`.serving` tells a serving start how to use one)."""
