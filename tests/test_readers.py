"""pyrank's own safetensors reader against the safetensors library's writer and reader."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from pyrank.io import PyrankIOError, open_weights

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool]


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=5),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_reads_what_safetensors_wrote_bitwise(tmp_path_factory, shapes, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=g) * 100
        tensors[f"t{i}"] = (t > 0) if dtypes[i] == torch.bool else t.to(dtypes[i])
    path = str(tmp_path_factory.mktemp("st") / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    w = open_weights(path)
    assert set(w) == set(tensors)
    with safe_open(path, "pt") as f:
        for name, t in tensors.items():
            got = w[name]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8), f.get_tensor(name).view(-1).view(torch.uint8))
            assert w.shape_dtype(name) == (tuple(t.shape), str(t.dtype))
            if t.dim() and t.shape[0]:
                for a, b in ((0, 1), (t.shape[0] - 1, t.shape[0]), (1, t.shape[0])):
                    # (bytes compared flat: an empty reference may have stride 0, which
                    # view(uint8) refuses — e.g. (randn(1, 0, 1) * 100).to(bfloat16))
                    got, ref = w.rows(name, a, b), t[a:b]
                    assert got.shape == ref.shape
                    assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_truncated_and_corrupted_files_are_named(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(64, 64), "b": torch.randn(3)}, path)
    data = open(path, "rb").read()
    for bad, why in ((data[:-10], "truncated"), (data[:5], "shorter"), (b"\xff" * 8 + data[8:], "header length"),
                     (data[:8] + b"[" + data[9:], "")):
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(PyrankIOError, match=f"{path}: cannot read safetensors file.*{why}"):
            open_weights(path)


def test_a_file_shortened_after_opening_is_named(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(64, 64)}, path)
    w = open_weights(path)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(PyrankIOError, match=f"{path}: cannot read tensor 'a' .*early"):
        w["a"]


def test_reads_leave_the_file_untouched_and_share_no_memory(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.ones(8, 8)}, path)
    before = open(path, "rb").read()
    w = open_weights(path)
    t = w["a"]
    t += 1  # the tensor is the reader's own copy: writing it changes neither the file nor a re-read
    assert open(path, "rb").read() == before
    assert torch.equal(w["a"], torch.ones(8, 8))


def test_a_pooled_buffer_is_reused_only_once_nothing_holds_its_tensor(tmp_path):
    from pyrank.io.readers import BufferPool, _storage_use_count, read_tensor

    path = str(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(96, 64, generator=g), "small": torch.randn(5, 7, generator=g),
               "half": torch.randn(64, 64, generator=g).to(torch.bfloat16)}
    save_file(tensors, path)
    w = open_weights(path)
    pool = BufferPool(keep=2)
    a = read_tensor(w, "big", pool)
    view = a[3:].T  # a view alone keeps the buffer busy
    del a
    b = read_tensor(w, "big", pool)
    assert b.data_ptr() != view.data_ptr() - 3 * 64 * 4
    assert torch.equal(view, tensors["big"][3:].T) and torch.equal(b, tensors["big"])
    if _storage_use_count is None:
        pytest.skip("this torch has no storage use count: the pool allocates every read")
    first = view.data_ptr() - 3 * 64 * 4
    del view
    # free again: the smallest buffer that fits is reused, for a tensor of another dtype and size
    c = read_tensor(w, "small", pool)
    assert c.data_ptr() == first and torch.equal(c, tensors["small"])
    # both busy: a new buffer; the pool keeps 2, so it lets go of the oldest (c still holds it)
    d = read_tensor(w, "half", pool)
    assert d.data_ptr() not in (first, b.data_ptr()) and torch.equal(d, tensors["half"])
    assert len(pool._bufs) == 2 and first not in [buf.data_ptr() for buf, _ in pool._bufs]
    assert torch.equal(c, tensors["small"]) and torch.equal(b, tensors["big"])
    # a mapping that moves tensors to a device reads through the pool of the mapping it wraps
    from pyrank.io.readers import OnDevice

    e = read_tensor(OnDevice(w, "cpu"), "small", pool)
    assert torch.equal(e, tensors["small"]) and e.data_ptr() != c.data_ptr()


def test_the_parallel_copy_reads_the_same_bytes_and_names_a_short_or_missing_file(tmp_path, monkeypatch):
    """Large tensors are read on the kernels' threads (pyrank._C.read_file), one range each:
    forced here onto small tensors, with more ranges than bytes divide evenly."""
    from pyrank.io import readers

    if readers._parallel_read() is None:
        pytest.skip("pyrank._C is not built (or has no pread): every read is the Python loop")
    monkeypatch.setattr(readers, "READ_SPLIT", 7)
    monkeypatch.setattr(readers, "_kernel_threads", lambda: 3)
    calls = []
    fast = readers._parallel_read()
    monkeypatch.setattr(readers, "_parallel_read", lambda: lambda *a: (calls.append(a), fast(*a))[1])
    path = str(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 41, generator=g).to(torch.bfloat16), "b": torch.randn(5, generator=g),
               "c": torch.randn(1, 2, generator=g)}  # c: 8 bytes, one range (8 // 7 = 1): the Python loop
    save_file(tensors, path)
    w = open_weights(path)
    for name, t in tensors.items():
        assert torch.equal(w[name], t), name
    assert [a[-1] for a in calls] == [3, 2] and calls[0][2] == 37 * 41 * 2  # b: 20 bytes, 2 ranges
    # a file name that is not valid UTF-8 reaches the C++ reader as the OS spells it
    odd = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"model-\xff.safetensors"))
    try:
        save_file(tensors, odd)
    except (OSError, UnicodeError):
        pass  # a filesystem that refuses such names
    else:
        assert torch.equal(open_weights(odd)["a"], tensors["a"]) and len(calls) == 3
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(PyrankIOError, match=f"{path}: cannot read tensor '[ab]' .*early"):
        [w[n] for n in ("a", "b")]
    os.remove(path)
    with pytest.raises(PyrankIOError, match=f"{path}: cannot read tensor 'a' .*No such file"):
        w["a"]
