"""The per-field layout table: a StreamStates field added without touching state/ (``adapt``,
added by the forecaster work, first with no LAYOUT line) is stored, fenced and loaded; a value
of another size or layout version is detected, never misread."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import redis

from kernels.states import LAYOUT, Positions, StreamStates, field_names, layout_of
from state import codec
from state.store import StateStore

L, H, F, A = 2, 3, 1, 5


def fresh(n: int) -> StreamStates:
    return StreamStates.zeros(n, L, H, F, adapt=A)


def test_every_field_has_a_layout() -> None:
    for name in field_names():
        spec = layout_of(name, getattr(fresh(1), name).dtype)
        assert spec.dtype.startswith("<") and spec.version >= 1
    unlisted = layout_of("a_field_being_added", np.float64)  # no LAYOUT line yet: raw float64, v1, fresh
    assert "a_field_being_added" not in LAYOUT
    assert (unlisted.dtype, unlisted.version, unlisted.other_layout) == ("<f8", 1, "fresh")
    assert layout_of("adapt", np.float64).other_layout == "fresh"
    assert "adapt:1" in codec.layout_tag(field_names()) and "h:" not in codec.layout_tag(field_names())


def test_an_added_field_round_trips_and_a_size_change_is_detected(redis_url: str) -> None:
    t = "lay" + uuid.uuid4().hex[:8]
    ids = [f"{t}-a", f"{t}-b"]
    st = fresh(2)
    st.adapt[:] = np.arange(2 * A).reshape(2, A) / 3.0
    st.h[:] = 1.5
    z = np.zeros(2, np.int64)

    async def go() -> tuple[Any, Any, Any]:
        store = await StateStore.connect(redis_url, model_version="m-lay", num_layers=L, hidden_size=H, input_size=F,
                                         fresh=fresh)
        try:
            await store.save(ids, st, Positions.build(z, z + 1, z, [1.0, 1.0]))
            back = await store.load(ids)
            # Another size of adapt (e.g. written by another version of the adapter): that field
            # starts afresh (counted), the rest of the state is kept.
            redis.Redis.from_url(redis_url).hset(codec.state_key(ids[1]), "adapt", np.ones(A + 2).tobytes())
            again = await store.load(ids)
            return back, again, store.counters()
        finally:
            await store.close()

    back, again, counters = asyncio.run(go())
    np.testing.assert_array_equal(back.states.adapt, st.adapt)
    raw = redis.Redis.from_url(redis_url).hgetall(codec.state_key(ids[0]))
    assert raw[b"adapt"] == st.adapt[0].astype("<f8").tobytes() and b"adapt:1" in raw[b"layout"]
    np.testing.assert_array_equal(again.states.adapt[0], st.adapt[0])
    assert (again.states.adapt[1] == 0).all() and (again.states.h[1] == 1.5).all()
    assert again.unreadable == [None, None] and counters["layout_resets"] == 1


def test_any_model_version_text_is_written_and_recognised(redis_url: str) -> None:
    """The model version is a constant of the fence script: quotes, backslashes and non-ASCII
    text must come out byte for byte (and the state must be recognised as that model's)."""
    version = "m-'\"\\]]--ü"
    sid = "lay-model-" + uuid.uuid4().hex[:8]

    async def go() -> Any:
        store = await StateStore.connect(redis_url, model_version=version, num_layers=L, hidden_size=H,
                                         input_size=F, fresh=fresh)
        try:
            one = np.zeros(1, np.int64)
            await store.save([sid], fresh(1), Positions.build(one, one, one, [1.0]))
            return await store.load([sid])
        finally:
            await store.close()

    loaded = asyncio.run(go())
    assert loaded.found[0] and not loaded.other_model[0] and loaded.unreadable == [None]
    assert redis.Redis.from_url(redis_url).hget(codec.state_key(sid), "model") == version.encode()
