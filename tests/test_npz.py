"""The frame writer: files that np.load and zipfile read as np.savez's own, for every kind of
array a frame holds, and np.savez itself where the lean path does not apply."""

import io
import zipfile

import numpy as np
import pytest

from probescope import npz


def arrays_of_every_kind(rng):
    return {
        "probs": rng.random((33, 17, 7), dtype=np.float32),
        "rgba": rng.integers(0, 256, (33, 17, 4), dtype=np.uint8),
        "series/train_loss/steps": np.arange(1001, dtype=np.int64),
        "series/train_loss/values": rng.standard_normal(1001),
        "half": rng.standard_normal((5, 3)).astype(np.float16),
        "mask": rng.random(9) > 0.5,
        "complex": rng.standard_normal(4) + 1j * rng.standard_normal(4),
        "fortran": np.asfortranarray(rng.standard_normal((6, 4))),
        "strided": rng.standard_normal((8, 10))[::2, 1::3],
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float64(2.5),
        "int scalar": np.int64(-7),
        "0-d array": np.array(3, np.int32),
        "big-endian": np.arange(5, dtype=">i4"),
        "record": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i2"), ("b", "<f8")]),
        "text": np.array(["ab", "cde"]),
        "act/block.0/mean": np.float32(0.25),
        "état/μ": np.arange(3.0),  # a UTF-8 entry name
        "nan": np.array([np.nan, np.inf, -np.inf], np.float32),
    }


def load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {key: z[key] for key in z.files}


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        value = np.asarray(value)
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def written(arrays) -> bytes:
    f = io.BytesIO()
    npz.write_npz(f, arrays)
    return f.getvalue()


def test_every_kind_of_array_reads_back_as_np_savez_writes_it():
    arrays = arrays_of_every_kind(np.random.default_rng(0))
    data = written(arrays)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every entry's CRC checks out
    assert_same(load(data), arrays)
    reference = io.BytesIO()
    np.savez(reference, **arrays)
    assert_same(load(data), load(reference.getvalue()))
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names == [f"{key}.npy" for key in arrays]  # the names np.savez gives
    assert len(data) <= len(reference.getvalue())  # no padding beyond np.savez's


def test_an_entry_is_the_npy_file_numpy_writes_for_the_array():
    """Byte for byte, for every kind of array numpy writes in C order, in a first frame and in
    a second one of the same dtypes and shapes (whose headers were made once)."""
    for seed in (1, 2):
        arrays = arrays_of_every_kind(np.random.default_rng(seed))
        del arrays["fortran"]  # (np.save writes it in Fortran order; a frame's entry in C order)
        with zipfile.ZipFile(io.BytesIO(written(arrays))) as z:
            for key, value in arrays.items():
                npy = io.BytesIO()
                np.save(npy, value)
                assert z.read(f"{key}.npy") == npy.getvalue(), key
                assert z.getinfo(f"{key}.npy").compress_type == zipfile.ZIP_STORED


def test_a_file_on_disk_through_a_buffered_writer(tmp_path):
    arrays = arrays_of_every_kind(np.random.default_rng(2))
    arrays["large"] = np.random.default_rng(3).random((512, 512, 3), dtype=np.float32)  # written through
    path = tmp_path / "frame.npz"
    with open(path, "wb") as f:
        npz.write_npz(f, arrays)
    assert_same(load(path.read_bytes()), arrays)


def test_no_arrays_is_an_empty_archive():
    data = written({})
    assert load(data) == {} and zipfile.ZipFile(io.BytesIO(data)).namelist() == []


@pytest.mark.parametrize(
    "arrays",
    [
        {"objects": np.array([{"a": 1}, None], dtype=object)},
        {"wide": np.zeros(2, [(f"field{i:05d}", "<f4") for i in range(4000)])},  # header > 65 535 bytes
    ],
    ids=["object arrays", "long header"],
)
@pytest.mark.filterwarnings("ignore:Stored array in format 2.0")
def test_what_the_lean_path_does_not_cover_goes_to_np_savez(arrays, monkeypatch):
    calls = []
    savez = np.savez
    monkeypatch.setattr(np, "savez", lambda f, **a: calls.append(sorted(a)) or savez(f, **a))
    data = written(arrays)
    assert calls == [sorted(arrays)]
    with np.load(io.BytesIO(data), allow_pickle=True) as z:
        for key, value in arrays.items():
            assert z[key].shape == value.shape
            if value.dtype != object:
                np.testing.assert_array_equal(z[key], value)


def test_sizes_that_need_zip64_go_to_np_savez(monkeypatch):
    monkeypatch.setattr(npz, "_LIMIT", 1000)  # as if these few bytes were 4 GiB
    calls = []
    savez = np.savez
    monkeypatch.setattr(np, "savez", lambda f, **a: calls.append(1) or savez(f, **a))
    arrays = {"a": np.zeros(100), "b": np.ones(100)}
    assert_same(load(written(arrays)), arrays)
    assert calls == [1]
    calls.clear()
    small = {"a": np.zeros(10)}
    assert_same(load(written(small)), small)
    assert calls == []  # under the limit: the lean path
