"""Values across the boundary: readable JSON, exact round trips, handles for everything else."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pytest

from durable_monty_nb import Engine
from durable_monty_nb.values import ValueCodec

ROUND_TRIPS = [
    0,
    -5,
    2**80,
    1.5,
    float("inf"),
    True,
    None,
    "text",
    "",
    [1, [2, 3]],
    {"a": 1, "b": [True]},
    (1, "x"),
    {1, 2},
    frozenset({"f"}),
    b"\x00bytes",
    complex(1, -2),
    Decimal("1.10"),
    dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.date(2024, 2, 29),
    dt.time(12, 30),
    dt.timedelta(days=2, seconds=5),
    PurePosixPath("/data/x.csv"),
    {"$tricky": 1},
    {1: "int key", (2, 3): "tuple key"},
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=repr)
def test_native_values_round_trip_exactly(value: object) -> None:
    codec = ValueCodec()
    text, _sandbox = codec.encode(value)
    back = codec.decode_host(text)
    assert back == value and type(back) is type(value)
    assert codec.pending_blobs == {}  # nothing needed pickling


def test_json_friendly_values_are_stored_readably() -> None:
    text = ValueCodec().encode_text({"name": "clip.mp4", "sizes": [1, 2], "ok": True})
    assert json.loads(text) == {"name": "clip.mp4", "sizes": [1, 2], "ok": True}


@dataclass
class Point:
    x: int
    y: int


def test_other_objects_become_signed_blobs_with_handles() -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    codec = ValueCodec()
    text, _sandbox = codec.encode([frame, Point(1, 2)])
    tree = json.loads(text)
    assert [item["t"] for item in tree] == ["pandas.DataFrame", "test_values.Point"]
    assert len(codec.pending_blobs) == 2
    blobs = {k: v[0] for k, v in codec.pending_blobs.items()}
    fresh = ValueCodec(load_blob=blobs.__getitem__)
    restored = fresh.decode_host(text)
    assert restored[0].equals(frame) and restored[1] == Point(1, 2)


def test_numpy_scalars_become_python_numbers() -> None:
    codec = ValueCodec()
    _text, sandbox = codec.encode([np.int64(3), np.float32(0.5), np.bool_(True)])
    assert sandbox == [3, 0.5, True] and [type(v) for v in sandbox] == [int, float, bool]


def test_equal_objects_share_one_blob() -> None:
    codec = ValueCodec()
    codec.encode([pd.DataFrame({"a": [1]}), pd.DataFrame({"a": [1]})])
    assert len(codec.pending_blobs) == 1


def load(n: int) -> pd.DataFrame:
    return pd.DataFrame({"n": range(n)})


def rows(df: pd.DataFrame) -> int:
    assert isinstance(df, pd.DataFrame)  # the function gets the real object back
    return len(df)


def stack(frames: list[pd.DataFrame]) -> np.ndarray:
    return np.concatenate([f["n"].to_numpy() for f in frames])


def test_dataframes_and_arrays_flow_through_a_workflow(engine: Engine) -> None:
    code = """
frames = await gather(*[load(n) for n in sizes])
counts = await gather(*[rows(f) for f in frames])
array = stack(frames)
label = str(type(frames[0]).__name__)
(counts, array, label)
"""
    run = engine.start(code, {"load": load, "rows": rows, "stack": stack, "sizes": [2, 3]}, key="frames")
    counts, array, label = run.result(timeout=60)
    assert counts == [2, 3] and label == "DataFrame"
    assert isinstance(array, np.ndarray) and array.tolist() == [0, 1, 0, 1, 2]
    frames = run.outputs["frames"]
    assert all(isinstance(f, pd.DataFrame) for f in frames) and frames[1]["n"].tolist() == [0, 1, 2]

    # Run again: the stored result comes back with the real objects, from the store.
    again = Engine(engine.store.url).start(
        code, {"load": load, "rows": rows, "stack": stack, "sizes": [2, 3]}, key="frames"
    )
    assert again.cached
    assert again.result()[1].tolist() == [0, 1, 0, 1, 2]
    assert again.outputs["frames"][0].equals(frames[0])


def test_namespace_dataframe_reaches_functions(sqlite_engine: Engine) -> None:
    frame = pd.DataFrame({"n": range(4)})
    assert sqlite_engine.run("await rows(data)", {"rows": rows, "data": frame}, key="ns-frame") == 4


def test_equal_objects_from_different_calls_cross_as_one_handle(sqlite_engine: Engine) -> None:
    # Equal frames have one content key; the sandbox must get one handle object for it.
    code = "pair = await gather(load(2), load(2))\nawait gather(*[rows(f) for f in pair])"
    assert sqlite_engine.run(code, {"load": load, "rows": rows}, key="twins") == [2, 2]
