"""Engine-layout entries on the host tier, without an engine: the key and its hash, a
bit-exact export → attach round trip, misses on any key change, and the entry behaving as
any other (leases stop eviction, capacity is reserved first, status lists its key)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.models import random_tensor, write_model
from tests.pool_env import run_cli, run_python, segments_of
from tests.workers_env import same_bits
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.engine_layouts import attach_engine_layout, engine_layouts, export, export_sync
from warmpool.errors import CapacityError, LeaseHeldError
from warmpool.pool.engine_key import EngineKey, layout_uri
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch

KEY = EngineKey(checkpoint="ab" * 32, engine="vllm", engine_version="0.32.0",
                dtype="bfloat16", quantization="none", tp_size=2, rank=1)
URI = "file:///models/tiny/"


def processed_params() -> dict[str, torch.Tensor]:
    """What an engine might hold: fused, odd shapes, every width of dtype, a scalar, an
    empty tensor, and a non-contiguous one (a transpose)."""
    gen = torch.Generator().manual_seed(7)
    return {
        "model.layers.0.self_attn.qkv_proj.weight": random_tensor((48, 16), torch.bfloat16, gen),
        "model.layers.0.mlp.gate_up_proj.weight": random_tensor((64, 16), torch.float16, gen),
        "model.norm.weight": random_tensor((16,), torch.float32, gen),
        "lm_head.qweight": random_tensor((5, 7), torch.int8, gen),
        "scale": random_tensor((), torch.float32, gen),
        "empty": random_tensor((0, 3), torch.bfloat16, gen),
        "transposed": random_tensor((9, 4), torch.float32, gen).t(),
        "mask": random_tensor((3,), torch.bool, gen),
    }


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_key_json_is_stable_and_every_field_changes_the_hash() -> None:
    again = EngineKey.from_json(json.loads(KEY.dumps()))
    assert again == KEY and again.content_hash == KEY.content_hash
    assert KEY.dumps() == ('{"checkpoint":"' + "ab" * 32 + '","dtype":"bfloat16",'
                           '"engine":"vllm","engine_version":"0.32.0","quantization":"none",'
                           '"rank":1,"tp_size":2}')
    changed = [replace(KEY, checkpoint="cd" * 32), replace(KEY, engine="sglang"),
               replace(KEY, engine_version="0.32.1"), replace(KEY, dtype="float16"),
               replace(KEY, quantization="fp8"), replace(KEY, tp_size=4),
               replace(KEY, rank=0)]
    hashes = {k.content_hash for k in changed} | {KEY.content_hash}
    assert len(hashes) == len(changed) + 1
    assert all(len(h) == 64 for h in hashes) and KEY.content_hash != KEY.checkpoint
    with pytest.raises(ValueError):
        replace(KEY, rank=2)
    with pytest.raises(ValueError):
        EngineKey.from_json({"engine": "vllm"})


def test_export_then_attach_is_bit_exact_from_another_process(settings: Settings) -> None:
    params = processed_params()
    result = export_sync(KEY, params.items(), checkpoint_uri=URI, settings=settings)
    assert not result.already_warm
    entry = result.entry
    assert entry.state == State.WARM and entry.content_hash == KEY.content_hash
    assert entry.engine == KEY.to_json() and entry.uri == layout_uri(URI, KEY)
    assert entry.tensors == len(params) and entry.loader == "export:vllm"

    with attach_engine_layout(KEY, settings, holder="test") as model:  # type: ignore[union-attr]
        assert sorted(model) == sorted(params)
        for name, tensor in params.items():
            assert same_bits(model[name], tensor), name
            assert model[name].is_contiguous()
        # The published layout reads back whole (as an engine asks for it).
        assert [s.name for s in model.layout.slots] == list(params)
        assert {s.file for s in model.layout.slots} == {"engine"}
        # Views of the one shared segment, not copies.
        base = model[next(iter(model))].untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == base for t in model.values())

    # A fresh process (a second engine) sees the same bytes.
    expected = {n: t.float().sum().item() for n, t in params.items() if t.numel()}
    code = (
        "import json, sys\n"
        "from warmpool.config import Settings\n"
        "from warmpool.engine_layouts import EngineKey, attach_engine_layout\n"
        "key = EngineKey.from_json(json.loads(sys.argv[1]))\n"
        "m = attach_engine_layout(key, Settings.load())\n"
        "print(json.dumps({n: t.float().sum().item() for n, t in m.items() if t.numel()}))\n")
    proc = run_python(code, argv=[KEY.dumps()])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected

    again = export_sync(KEY, params.items(), checkpoint_uri=URI, settings=settings)
    assert again.already_warm and again.entry.content_hash == entry.content_hash
    assert engine_layouts(settings) == [KEY]
    assert engine_layouts(settings, checkpoint="cd" * 32) == []


@pytest.mark.parametrize("change", [{"dtype": "float16"}, {"tp_size": 4},
                                    {"engine_version": "0.33.0"}, {"quantization": "fp8"},
                                    {"rank": 0}])
def test_any_key_change_misses_and_says_why(settings: Settings, change: dict[str, object],
                                            caplog: pytest.LogCaptureFixture) -> None:
    export_sync(KEY, processed_params().items(), checkpoint_uri=URI, settings=settings)
    other = replace(KEY, **change)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="warmpool.engine_layouts"):
        assert attach_engine_layout(other, settings) is None
    field, value = next(iter(change.items()))
    message = caplog.text
    assert "no engine layout for" in message and KEY.label() in message
    assert f"{field} {value!r} != {getattr(KEY, field)!r}" in message
    assert attach_engine_layout(replace(KEY, checkpoint="cd" * 32), settings) is None


def test_evict_is_refused_while_an_engine_holds_the_layout(settings: Settings) -> None:
    export_sync(KEY, processed_params().items(), checkpoint_uri=URI, settings=settings)
    pool = Pool(settings)
    model = attach_engine_layout(KEY, settings, holder="engine")
    assert model is not None
    with pytest.raises(LeaseHeldError):
        run(pool.evict(KEY.content_hash))
    assert run(pool.find(KEY.content_hash)) is not None
    model.close()
    evicted = run(pool.evict(KEY.content_hash))
    assert evicted.state == State.EVICTED and evicted.engine == KEY.to_json()
    assert segments_of(settings) == [] and attach_engine_layout(KEY, settings) is None
    # Its URI is no model URI: nobody evicts or attaches it by the checkpoint's name.
    proc = run_cli("evict", layout_uri(URI, KEY))
    assert proc.returncode != 0


def test_status_lists_the_key(settings: Settings) -> None:
    export_sync(KEY, processed_params().items(), checkpoint_uri=URI, settings=settings)
    proc = run_cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["engine"] == KEY.to_json() and entry["state"] == "warm"
    assert entry["content_hash"] == KEY.content_hash
    table = run_cli("status")
    assert table.returncode == 0 and "vllm-0.32.0" in table.stdout.replace("\n", "")


def test_checkpoint_and_layout_of_one_uri_stay_apart(settings: Settings, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=2)
    checkpoint = run(prefetch(str(model_dir), settings=settings)).entry
    key = replace(KEY, checkpoint=checkpoint.content_hash)
    export_sync(key, processed_params().items(), checkpoint_uri=checkpoint.uri,
                settings=settings)
    # A re-export must not retire the checkpoint (different URI), and attach by the
    # checkpoint's URI still gets the checkpoint's tensors.
    with attach(str(model_dir), settings=settings) as model:
        assert model.content_hash == checkpoint.content_hash
        assert "qkv_proj" not in " ".join(model)
    states = {e.content_hash: e.state for e in run(Pool(settings).entries())}
    assert states == {checkpoint.content_hash: State.WARM, key.content_hash: State.WARM}


def test_evicting_the_checkpoint_evicts_its_layouts(settings: Settings, tmp_path: Path) -> None:
    """A layout is made of its checkpoint's bytes: evicting the checkpoint (by its URI)
    takes the layout with it, so no engine attaches weights of a model that was evicted.
    A leased layout stays until its lease ends, and the checkpoint goes regardless."""
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=2)
    checkpoint = run(prefetch(str(model_dir), settings=settings)).entry
    key = replace(KEY, checkpoint=checkpoint.content_hash)
    other = replace(key, rank=0)
    for k in (key, other):
        export_sync(k, processed_params().items(), checkpoint_uri=checkpoint.uri,
                    settings=settings)
    held = attach_engine_layout(other, settings, holder="engine")
    assert held is not None
    run(Pool(settings).evict(str(model_dir)))
    states = {e.content_hash: e.state for e in run(Pool(settings).entries())}
    assert states[checkpoint.content_hash] == State.EVICTED
    assert states[key.content_hash] == State.EVICTED
    assert attach_engine_layout(key, settings) is None
    assert states[other.content_hash] == State.WARM  # leased: kept while the engine runs
    held.close()


def test_a_new_version_retires_the_old_versions_layouts(settings: Settings,
                                                        tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=1)
    old = run(prefetch(str(model_dir), settings=settings)).entry
    key = replace(KEY, checkpoint=old.content_hash)
    export_sync(key, processed_params().items(), checkpoint_uri=old.uri, settings=settings)
    write_model(model_dir, shards=1, seed=11)  # a new version under the same URI
    new = run(prefetch(str(model_dir), settings=settings)).entry
    assert new.content_hash != old.content_hash
    states = {e.content_hash: e.state for e in run(Pool(settings).entries())}
    assert states[old.content_hash] == State.EVICTED
    assert states[key.content_hash] == State.EVICTED
    assert attach_engine_layout(key, settings) is None


def test_a_registry_that_lost_the_entry_adopts_it_with_its_key(settings: Settings) -> None:
    export_sync(KEY, processed_params().items(), checkpoint_uri=URI, settings=settings)
    pool = Pool(settings)
    run(pool.registry.delete(f"{KEY.content_hash}@cpu"))
    [adopted] = run(pool.adopt_residents())
    assert adopted.engine == KEY.to_json() and adopted.uri == layout_uri(URI, KEY)


def test_a_failed_export_leaves_nothing(settings: Settings) -> None:
    params = processed_params()
    params["model.bad"] = torch.empty(4, device="meta")
    with pytest.raises(TypeError, match="model.bad"):
        export_sync(KEY, params.items(), checkpoint_uri=URI, settings=settings)
    assert segments_of(settings) == []
    [entry] = run(Pool(settings).entries())
    assert entry.state == State.FAILED and "model.bad" in (entry.error or "")
    assert attach_engine_layout(KEY, settings) is None


def test_capacity_is_reserved_before_a_byte_is_written(settings: Settings) -> None:
    tight = Settings.load(host_capacity=1024)
    with pytest.raises(CapacityError):
        run(export(KEY, processed_params().items(), checkpoint_uri=URI, settings=tight))
    assert segments_of(settings) == []
    assert [e.state for e in run(Pool(settings).entries())] == [State.FAILED]


def test_export_sync_works_inside_a_running_loop(settings: Settings) -> None:
    async def inside() -> bool:
        result = export_sync(KEY, processed_params().items(), checkpoint_uri=URI,
                             settings=settings)
        return result.entry.state == State.WARM

    assert run(inside())


def test_engine_loader_options_take_export_and_engine_layout() -> None:
    from warmpool.errors import ConfigError
    from warmpool.integrations.weights import LoaderOptions

    assert LoaderOptions.parse(None) == LoaderOptions(export=False, engine_layout=True)
    parsed = LoaderOptions.parse('{"export": true, "engine_layout": false}')
    assert parsed.export is True and parsed.engine_layout is False
    with pytest.raises(ConfigError, match="export must be true or false"):
        LoaderOptions.parse({"export": "yes"})
