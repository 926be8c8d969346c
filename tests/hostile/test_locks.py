"""File locks under a crowd: the default executor must never deadlock on ``flock``.

Each case runs in its own interpreter with a two-thread default executor (production
has a handful and starts every desired warm-up at once), so a deadlock fails the test
by its timeout instead of hanging the suite on threads stuck in ``flock``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from tests.models import write_model
from tests.pool_env import run_python
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State

CROWD = 6  # coroutines waiting for one lock, three times the executor's threads


def test_crowd_on_one_lock_does_not_starve_its_holder(tmp_path: Path) -> None:
    """The user gets: every coroutine through the pool lock, in turn, even when the
    holder needs a thread (for a second lock) while the others wait for the first."""
    code = textwrap.dedent(f"""
        import asyncio, concurrent.futures
        from pathlib import Path
        from warmpool.locks import async_file_lock

        root = Path({str(tmp_path)!r})
        done = []

        async def one(i):
            async with async_file_lock(root / "pool.lock"):
                await asyncio.sleep(0)  # the others queue for the pool lock meanwhile
                async with async_file_lock(root / f"entry-{{i}}.lock"):
                    done.append(i)

        async def main():
            asyncio.get_running_loop().set_default_executor(
                concurrent.futures.ThreadPoolExecutor(2))
            await asyncio.gather(*(one(i) for i in range({CROWD})))
            print(sorted(done))

        asyncio.run(main())
    """)
    result = run_python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(list(range(CROWD)))


async def test_concurrent_prefetches_with_eviction_on_two_threads(tmp_path: Path,
                                                                 settings: Settings) -> None:
    """The user gets: six models prefetched at once into a pool that holds one, each
    evicting the last, all finished (the last one warm, bit-exact), none hung."""
    models, tensors = [], []
    for i in range(CROWD):
        tensors.append(write_model(tmp_path / f"m{i}", shards=1, seed=i))
        models.append(str(tmp_path / f"m{i}"))
    code = textwrap.dedent(f"""
        import asyncio, concurrent.futures, json
        from warmpool.config import Settings
        from warmpool.pool.entries import Pool
        from warmpool.tiers.prefetch import prefetch
        from warmpool.errors import WarmpoolError

        async def main():
            asyncio.get_running_loop().set_default_executor(
                concurrent.futures.ThreadPoolExecutor(2))
            settings = Settings.load()
            pool = Pool(settings)
            await prefetch({models[0]!r}, settings=settings, pool=pool)
            one = (await pool.entries())[0].bytes
            import dataclasses
            settings = dataclasses.replace(settings, host_capacity=one)
            pool = Pool(settings)
            results = await asyncio.gather(
                *(prefetch(m, settings=settings, pool=pool) for m in {models[1:]!r}),
                return_exceptions=True)
            print(json.dumps([type(r).__name__ for r in results]))

        asyncio.run(main())
    """)
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    # Each result is a warm model or a clear refusal (the entry it needed to evict was
    # still streaming), never a hang.
    assert set(outcomes) <= {"PrefetchResult", "CapacityError"}, outcomes
    assert "PrefetchResult" in outcomes
    [warm] = [e for e in await Pool(settings).entries() if e.state == State.WARM]
    index = models.index(warm.uri.removeprefix("file://").rstrip("/"))
    with attach(models[index], settings=settings) as weights:
        for name, tensor in tensors[index].items():
            assert torch.equal(weights[name].reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8)), name
