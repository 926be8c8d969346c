"""Views over one flat buffer: every tensor equals what slicing the buffer gives, and is
a view of the buffer's memory, not a copy (pure logic, no server)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmpool.pool.layout import Layout, Slot, align_up
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
