"""Worker processes that hold models resident on devices and serve them to serving
processes (installed as ``warmpool.workers``).

One job per module, in the order data flows:

- :mod:`.plan` — the client's plan: content hash, headers, a layout per rank.
- :mod:`.client`, :mod:`.cli` — what the ``warmpool`` command calls.
- :mod:`.supervisor` — one worker per device, restarted when it dies.
- :mod:`.worker` — the asyncio server that loads, serves attaches (the connection is the
  lease) and evicts; :mod:`.requests` what arrives on a connection; :mod:`.residents`
  what a worker holds and the eviction policy.
- :mod:`.coordinator` — tensor-parallel group loads; :mod:`.group` one rank streaming
  with runai's distributed mode.
- :mod:`.promote` — copying a host-tier model to a device without a storage read.
- :mod:`.buffers`, :mod:`.cuda_vmm`, :mod:`.cuda_ipc` — the one buffer per (model,
  device) and the three ways to share it.
- :mod:`.protocol`, :mod:`.discovery`, :mod:`.devices`, :mod:`.process` — the wire,
  finding workers, device identity by GPU UUID, process plumbing.

Serving processes attach through :mod:`warmpool.workers.gpu_attach`
(:mod:`warmpool.tiers.workers` calls it for every device but the host tier, ``cpu``).
"""
