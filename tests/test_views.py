"""Views over one flat buffer: every tensor equals what slicing the buffer gives, and is
a view of the buffer's memory, not a copy (pure logic, no server)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmpool.pool.layout import Layout, Slot, align_up
from warmpool.pool.layout_index import LayoutIndex, encode
from warmpool.pool.views import TORCH_DTYPES, tensor_views

DTYPES = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64", "F8_E4M3"]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def layout_of(specs: list[tuple[str, tuple[int, ...]]], alignment: int) -> Layout:
    slots, offset = [], 0
    for i, (dtype, shape) in enumerate(specs):
        offset = align_up(offset, alignment)
        nbytes = TORCH_DTYPES[dtype].itemsize
        for dim in shape:
            nbytes *= dim
        slots.append(Slot(f"t{i}", dtype, shape, offset, nbytes, "f.safetensors", 0))
        offset += nbytes
    return Layout("0" * 64, align_up(max(offset, 1), alignment), tuple(slots), alignment)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), shapes), max_size=12),
       st.sampled_from([8, 256]))
def test_views_are_the_buffer_sliced_and_share_its_memory(
        specs: list[tuple[str, tuple[int, ...]]], alignment: int) -> None:
    layout = layout_of(specs, alignment)
    buffer = torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8)
    views = tensor_views(buffer, layout)
    assert list(views) == [s.name for s in layout.slots]
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for s in layout.slots:
        view = views[s.name]
        expected = buffer[s.offset:s.offset + s.nbytes].view(TORCH_DTYPES[s.dtype]).view(s.shape)
        assert view.dtype == expected.dtype and view.shape == expected.shape
        assert view.is_contiguous()
        assert torch.equal(view.reshape(-1).view(torch.uint8),
                           expected.reshape(-1).view(torch.uint8)), s
        if view.numel():
            assert view.data_ptr() == start + s.offset and view.data_ptr() < end  # no copy
    if layout.slots and any(views[s.name].numel() for s in layout.slots):
        buffer.fill_(0)  # a change to the buffer shows through every view
        assert all(not bool(views[s.name].reshape(-1).view(torch.uint8).any())
                   for s in layout.slots)


def test_a_tensor_misaligned_for_its_dtype_is_refused() -> None:
    layout = layout_of([("BOOL", ()), ("I16", ())], alignment=1)
    with pytest.raises(ValueError, match="not aligned"):
        tensor_views(torch.zeros(layout.total_bytes, dtype=torch.uint8), layout)


def test_index_round_trips_the_layout() -> None:
    specs = [("BF16", (3, 4)), ("F32", ()), ("I64", (0, 2)), ("U8", (5,))]
    layout = layout_of(specs, 256)
    index = LayoutIndex.of(layout)
    assert index.to_layout() == layout
    assert (len(index), index.total_bytes, index.files) == (4, layout.total_bytes,
                                                            ["f.safetensors"])
    assert index.position("t2") == 2 and index.position("nope") is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
def test_index_round_trips_any_tensor_names(names: list[str]) -> None:
    """Names are untrusted header text: NUL, lone surrogates and the rest come back exactly."""
    layout = layout_of([("U8", (1,))] * len(names), 8)
    slots = tuple(dataclasses.replace(s, name=n, file=n + ".safetensors")
                  for s, n in zip(layout.slots, names))
    layout = dataclasses.replace(layout, slots=slots)
    index = LayoutIndex.of(layout)
    assert index.names == names and index.to_layout() == layout
    assert [index.position(n) for n in names] == list(range(len(names)))


def test_index_keeps_a_nul_and_a_lone_surrogate_in_names() -> None:
    names = ["a\x00b", "\udcff", "plain"]
    layout = layout_of([("U8", (1,))] * 3, 8)
    layout = dataclasses.replace(layout, slots=tuple(
        dataclasses.replace(s, name=n) for s, n in zip(layout.slots, names)))
    assert LayoutIndex.of(layout).names == names


def test_index_keeps_a_single_empty_file_name() -> None:
    layout = layout_of([("U8", (1,))], 8)
    layout = dataclasses.replace(layout, slots=(dataclasses.replace(layout.slots[0], file=""),))
    index = LayoutIndex.of(layout)
    assert index.files == [""] and index.to_layout() == layout


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), shapes), max_size=12),
       st.sampled_from([8, 256]))
def test_index_views_equal_layout_views(specs: list[tuple[str, tuple[int, ...]]],
                                        alignment: int) -> None:
    layout = layout_of(specs, alignment)
    buffer = torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8)
    lazy = tensor_views(buffer, LayoutIndex.of(layout))
    eager = tensor_views(buffer, layout)
    assert list(lazy) == list(eager) == [s.name for s in layout.slots]
    for name in eager:
        a, b = lazy[name], eager[name]
        assert (a.dtype, a.shape, a.stride(), a.data_ptr()) == (b.dtype, b.shape, b.stride(),
                                                                b.data_ptr())


def test_lazy_mapping_behaves_as_a_mapping_and_builds_views_on_demand() -> None:
    specs = [("BF16", (2, 3)), ("F32", (4,)), ("I16", ()), ("U8", (7,))]
    layout = layout_of(specs, 256)
    buffer = torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8)
    views = tensor_views(buffer, LayoutIndex.of(layout))
    assert len(views) == 4 and list(views) == list(views.keys()) == ["t0", "t1", "t2", "t3"]
    assert "t1" in views and "t9" not in views and 3 not in views
    assert views.get("t9") is None and repr(views).endswith("0 built)")
    t1 = views["t1"]
    assert views.get("t1") is t1 and views["t1"] is t1  # built once, then kept
    with pytest.raises(KeyError):
        views["t9"]
    slot = layout.slots[1]
    assert t1.numpy().tobytes() == buffer[slot.offset:slot.offset + slot.nbytes].numpy().tobytes()
    buffer[slot.offset:slot.offset + slot.nbytes] = 7  # the view is the buffer's memory
    assert t1.view(torch.uint8).eq(7).all()
    assert [n for n, _ in views.items()] == ["t0", "t1", "t2", "t3"]


def test_index_that_lies_about_its_slots_is_refused() -> None:
    layout = layout_of([("F32", (4,)), ("BF16", (2,))], 256)
    data = bytearray(encode(layout))
    buffer = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    nbytes_at = 64 + 8 * 2  # column "nbytes", first tensor
    bad = bytearray(data)
    bad[nbytes_at:nbytes_at + 8] = (10**6).to_bytes(8, "little")
    with pytest.raises(ValueError, match="outside the buffer"):
        tensor_views(buffer, LayoutIndex(bytes(bad)))
    bad = bytearray(data)
    bad[nbytes_at:nbytes_at + 8] = (12).to_bytes(8, "little")  # 4 floats are 16 bytes
    with pytest.raises(ValueError, match="does not match its bytes"):
        tensor_views(buffer, LayoutIndex(bytes(bad)))
    bad = bytearray(data)
    bad[64:64 + 8] = (2).to_bytes(8, "little")  # the F32 tensor at byte 2
    with pytest.raises(ValueError, match="misaligned"):
        tensor_views(buffer, LayoutIndex(bytes(bad)))
    with pytest.raises(ValueError, match="holds"):
        LayoutIndex(bytes(data[:-1]))
    with pytest.raises(ValueError, match="not a layout index"):
        LayoutIndex(b"X" * len(data))
