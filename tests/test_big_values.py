"""Big values (a pickle of BIG_BLOB or more): streamed from the value's own buffers, kept as files
beside a SQLite file store, keyed and signed by their BLAKE3-256, refused when tampered with."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from durable_monty_nb import Engine, TamperedDataError
from durable_monty_nb.errors import ValueCrossingError
from durable_monty_nb.store.store import Store
from durable_monty_nb.store.tables import BLOBS
from durable_monty_nb.values import BIG_BLOB, BlobData, ValueCodec, big_blob_digest, blob_key, pickle_blob

CODE = "arrays = await gather(*[make(i) for i in range(3)])\nframe = await table(2)\n[arrays, frame]"


def make(i: int) -> np.ndarray:
    return np.random.default_rng(i).random(300_000)  # 2.4 MB


def table(n: int) -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(n).random((40_000, 5)), columns=list("abcde"))  # 1.6 MB


def ns() -> dict[str, object]:
    return {"make": make, "table": table}


def blob_rows(store: Store) -> list[tuple[str, int, int]]:
    blobs = BLOBS
    with store.engine.connect() as conn:
        query = sa.select(blobs.c.key, blobs.c.size, sa.func.length(blobs.c.data))
        return [tuple(r) for r in conn.execute(query).all()]


def test_the_pieces_are_the_stream_of_pickle_dumps() -> None:
    for value in (make(0), table(1), {"a": make(1), "b": list(range(200_000))}, b"x" * BIG_BLOB, [1, "a"]):
        data = pickle_blob(value)
        expected = pickle.dumps(value, protocol=5)
        if len(expected) >= BIG_BLOB:
            assert type(data) is BlobData and data.join() == expected and data.size == len(expected)
            assert data.key == big_blob_digest([expected])[:32] != blob_key(expected)  # BLAKE3, not SHA-256
        else:
            assert data == expected


def test_big_values_are_files_beside_the_store_and_come_back_exactly(sqlite_engine: Engine) -> None:
    arrays, frame = sqlite_engine.run(CODE, ns(), key="big")
    store = sqlite_engine.store
    rows = blob_rows(store)
    assert len(rows) == 4 and all(size >= BIG_BLOB and stored == 0 for _, size, stored in rows)
    assert sorted(p.name for p in store.blob_dir.iterdir()) == sorted(k for k, _, _ in rows)
    assert all(store.blob_path(k).stat().st_size == size for k, size, _ in rows)

    again = Engine(store.url).start(CODE, ns(), key="big")  # a new process's engine: read from the files
    assert again.cached
    stored_arrays, stored_frame = again.result()
    for i, (array, stored) in enumerate(zip(arrays, stored_arrays, strict=True)):
        assert stored.dtype == array.dtype and np.array_equal(stored, make(i)) and stored.flags.writeable
    assert stored_frame.equals(frame) and stored_frame.equals(table(2)) and list(stored_frame.columns) == list("abcde")


def test_a_tampered_or_missing_blob_file_is_refused(sqlite_engine: Engine) -> None:
    sqlite_engine.run(CODE, ns(), key="big")
    store = sqlite_engine.store
    key = blob_rows(store)[0][0]
    path = store.blob_path(key)
    original = path.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 1  # one bit deep inside the array's data
    path.write_bytes(bytes(tampered))
    with pytest.raises(TamperedDataError, match="failed its integrity check"):
        store.load_blob(key)
    with pytest.raises(TamperedDataError):  # the stored run's result needs it: never unpickled
        Engine(store.url).start(CODE, ns(), key="big").result()
    path.unlink()
    with pytest.raises(TamperedDataError, match="is missing"):
        store.load_blob(key)
    path.write_bytes(original)
    assert store.load_blob(key) == original


def test_a_row_emptied_to_point_at_a_planted_file_is_refused(sqlite_engine: Engine) -> None:
    assert sqlite_engine.run("await small()", {"small": lambda: np.arange(10)}, key="small").tolist() == list(range(10))
    store = sqlite_engine.store
    [(key, size, stored)] = blob_rows(store)
    assert stored == size  # a small value stays in its row
    store.blob_dir.mkdir(exist_ok=True)
    store.blob_path(key).write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dm_blobs SET data = :d"), {"d": b""})
    with pytest.raises(TamperedDataError, match="failed its integrity check"):
        store.load_blob(key)


def test_a_value_changed_in_memory_before_its_commit_is_not_stored(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    codec = ValueCodec()
    array = np.zeros(300_000)
    codec.encode(array)
    array[123_456] = 1.0  # changed in place after it was encoded, before the step commits
    with pytest.raises(ValueCrossingError, match="changed in memory"), store.engine.begin() as conn:
        store._insert_blobs(conn, codec.pending_blobs, 0.0)
    assert blob_rows(store) == []
    assert not store.blob_dir.exists() or list(store.blob_dir.iterdir()) == []


def test_big_rows_keyed_by_sha256_still_load(sqlite_url: str) -> None:
    store = Store(sqlite_url)  # a big pickle stored before BLAKE3 keys, or a big argument text
    data = pickle.dumps(make(4), protocol=5)
    key = blob_key(data)
    with store.engine.begin() as conn:
        store._insert_blobs(conn, {key: (data, "numpy.ndarray")}, 0.0)
    assert blob_rows(store) == [(key, len(data), len(data))]
    assert store.load_blob(key) == data
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dm_blobs SET data = :d"), {"d": data[:-1] + b"!"})
    with pytest.raises(TamperedDataError):
        store.load_blob(key)


def test_a_store_without_a_folder_keeps_big_values_in_their_rows(tmp_path: Path) -> None:
    store = Store("sqlite://")  # in memory: no folder beside it
    assert store.blob_dir is None
    codec = ValueCodec(store.load_blob)
    value = make(3)
    codec.encode(value)
    [key] = codec.pending_blobs
    with store.engine.begin() as conn:
        store._insert_blobs(conn, codec.pending_blobs, 0.0)
    assert blob_rows(store) == [(key, len(pickle.dumps(value, protocol=5)), len(pickle.dumps(value, protocol=5)))]
    assert np.array_equal(ValueCodec(store.load_blob).resolve_handle(key), value)


def test_prune_removes_the_files_of_the_blobs_it_collects(sqlite_engine: Engine) -> None:
    def big(i: int) -> np.ndarray:
        return np.full(200_000, i, dtype=np.int64)  # 1.6 MB

    code = "a = await big(1)\nb = await big({n})\n[a, b]"
    sqlite_engine.run(code.format(n=2), {"big": big}, key="k")
    sqlite_engine.run(code.format(n=3), {"big": big}, key="k")  # array 1 reused, 3 new, 2 only the first's
    store = sqlite_engine.store
    assert len(list(store.blob_dir.iterdir())) == 3
    removal = sqlite_engine.prune()
    assert removal.blobs == 1 and removal.bytes > 1_600_000
    assert removal.store_bytes_after < removal.store_bytes_before - 1_500_000  # the file's space counts
    kept = sorted(k for k, _, _ in blob_rows(store))
    assert sorted(p.name for p in store.blob_dir.iterdir()) == kept and len(kept) == 2
    again = sqlite_engine.start(code.format(n=3), {"big": big}, key="k")
    a, b = again.result()
    assert again.cached and int(a[0]) == 1 and int(b[-1]) == 3


def test_forget_removes_the_files_only_the_forgotten_workflow_used(sqlite_engine: Engine) -> None:
    def big(i: int) -> np.ndarray:
        return np.full(200_000, i, dtype=np.int64)  # 1.6 MB

    sqlite_engine.run("a = await big(1)\nb = await big(2)\n[a, b]", {"big": big}, key="kept")
    sqlite_engine.run("c = await big(2)\nd = await big(3)\n[c, d]", {"big": big}, key="gone")  # 2 shared
    store = sqlite_engine.store
    assert len(list(store.blob_dir.iterdir())) == 3
    store.forget("gone")
    kept = sorted(k for k, _, _ in blob_rows(store))
    assert sorted(p.name for p in store.blob_dir.iterdir()) == kept and len(kept) == 2  # 3's file went
    a, b = Engine(store.url).start("a = await big(1)\nb = await big(2)\n[a, b]", {"big": big}, key="kept").result()
    assert int(a[0]) == 1 and int(b[-1]) == 2


def test_big_values_round_trip_on_every_backend(engine: Engine) -> None:
    arrays, frame = engine.run(CODE, ns(), key="big")
    stored = blob_rows(engine.store)
    in_rows = engine.store.blob_dir is None  # server databases keep them in their rows
    assert len(stored) == 4 and all((length == size) is in_rows for _, size, length in stored)
    again = Engine(engine.store.url).start(CODE, ns(), key="big")
    stored_arrays, stored_frame = again.result()
    assert again.cached and stored_frame.equals(frame)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, stored_arrays, strict=True))


def test_prune_sweeps_files_no_row_names(sqlite_engine: Engine) -> None:
    sqlite_engine.run(CODE, ns(), key="big")
    store = sqlite_engine.store
    kept = sorted(k for k, _, _ in blob_rows(store))
    stray = store.blob_path("0" * 32)  # a step rolled back after writing its files
    stray.write_bytes(b"x" * 1000)
    partial = store.blob_dir / f".{'1' * 32}.123.456.tmp"  # a writer killed while writing
    partial.write_bytes(b"y" * 1000)
    removal = sqlite_engine.prune()
    assert removal.blobs == 0 and removal.bytes >= 2000
    assert sorted(p.name for p in store.blob_dir.iterdir()) == kept
    assert Engine(store.url).start(CODE, ns(), key="big").cached


def test_a_blob_read_by_many_calls_is_loaded_and_unpickled_once(sqlite_engine: Engine) -> None:
    frame = table(5)

    def rows(data: pd.DataFrame) -> int:
        return len(data)

    assert sqlite_engine.run("await rows(data)", {"rows": rows, "data": frame}, key="shared") == 40_000
    [(key, _, _)] = blob_rows(sqlite_engine.store)
    loads: list[str] = []

    def load(k: str) -> bytes:
        loads.append(k)
        return sqlite_engine.store.load_blob(k)

    codec = ValueCodec(load)  # a resumed run's codec: the handle's object comes from the store
    first, second = codec.resolve_handle(key), codec.resolve_handle(key)
    assert loads == [key] and first is second and first.equals(frame)


def test_a_run_that_stores_a_value_again_writes_its_missing_file(sqlite_engine: Engine) -> None:
    sqlite_engine.run(CODE, ns(), key="big")
    store = sqlite_engine.store
    lost = store.blob_path(blob_rows(store)[0][0])
    lost.unlink()  # the database was copied without its folder, say
    sqlite_engine.run(CODE, ns(), key="big", rerun=True)  # the calls run again: their results are stored again
    assert lost.exists()
    arrays, frame = Engine(store.url).start(CODE, ns(), key="big", rerun=False).result()
    assert frame.equals(table(2)) and all(np.array_equal(a, make(i)) for i, a in enumerate(arrays))


def test_a_relative_database_path_keeps_its_folder_where_the_database_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("sqlite:///rel.db")
    assert store.blob_dir == tmp_path / "rel.db-blobs"
