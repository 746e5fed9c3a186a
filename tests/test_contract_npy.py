"""contract.load_npy: np.save's plain headers take a regex fast path that must decode exactly as np.load does;
everything else goes through np.load, which still refuses pickles."""
from __future__ import annotations

import io

import numpy as np
import pytest

from tasks import contract

PLAIN = [
    np.random.default_rng(0).standard_normal((16, 9, 32, 32)).astype(np.float16),
    np.arange(5, dtype=np.int64),
    np.array(3.5, np.float32),
    np.zeros((0, 3), np.float32),
    np.array([[True, False, True]]),
    np.arange(6, dtype=">f4").reshape(2, 3),
    np.arange(4, dtype=np.uint8),
    np.arange(-3, 3, dtype=np.int8),
    np.linspace(0, 1, 7, dtype=np.float64),
]


def _saved(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("array", PLAIN, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_plain_arrays_decode_exactly_without_np_load(array, monkeypatch):
    data = _saved(array)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the fast path fell back to np.load"))
    out = contract.load_npy(data)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable and out.flags.c_contiguous
    out[...] = 0  # a copy: writing it leaves the input bytes alone
    np.testing.assert_array_equal(contract.load_npy(data), array)


def test_other_headers_go_through_np_load():
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    out = contract.load_npy(_saved(fortran))
    np.testing.assert_array_equal(out, fortran)
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])
    assert contract.load_npy(_saved(structured)).dtype == structured.dtype


def test_pickles_truncation_and_lying_headers_are_refused():
    with pytest.raises(ValueError, match="allow_pickle"):
        contract.load_npy(_saved(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    data = _saved(np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError):
        contract.load_npy(data[:-4])  # the body is one element short
    lying = data.replace(b"(10,)", b"(11,)")
    with pytest.raises(ValueError):
        contract.load_npy(lying)
