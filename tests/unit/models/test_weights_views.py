"""Reloading weights views the verified bytes instead of copying them (half the peak memory of a reload)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from sipstream.models.base import WeightsMismatchError, safetensors_views


def test_views_equal_what_safetensors_loads_for_every_dtype() -> None:
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(4).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8), "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
    }
    data = save(tensors, metadata={"step": "3"})
    expected, views = load(data), safetensors_views(data)
    assert views.keys() == expected.keys()
    for name, tensor in expected.items():
        assert views[name].dtype == tensor.dtype and views[name].shape == tensor.shape
        assert torch.equal(views[name], tensor)


def test_views_share_the_bytes_instead_of_copying() -> None:
    import ctypes

    data = save({"w": torch.ones(1024)})
    address = safetensors_views(data)["w"].untyped_storage().data_ptr()
    buffer_address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert buffer_address <= address < buffer_address + len(data)  # inside `data`, not a fresh allocation


def test_a_byte_range_that_does_not_fit_dtype_and_shape_is_refused() -> None:
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 12
    with pytest.raises(WeightsMismatchError, match="do not hold"):
        safetensors_views(data)
