"""The device seam: where a model is held, behind one interface.

Every question "the host tier or a worker's device?" is answered once, by
:func:`warmpool.tiers.base.tier_for`, from the device string: ``cpu`` is the host tier,
held in this process's shared memory (:mod:`.host`); ``cuda:N`` and ``cpu:N`` are the
devices of the node's worker processes (:mod:`.workers`). Both do the same five things —
load (fill from a source), attach, evict, export an engine layout, and tell which engine
layouts they hold — so prefetch, attach, the controller's dispatcher and the engine
integrations never branch on the device themselves.

The tiers sit above :mod:`warmpool.loading` and :mod:`warmpool.workers` (they call them)
and above :mod:`warmpool.pool` (the layout, views, registry, leases and host segments
they are built from); nothing below imports them.
"""
