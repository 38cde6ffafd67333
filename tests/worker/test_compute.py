"""worker/compute.py (pure): a non-finite step restarts its stream only; outputs match the engine."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from kernels import load_model
from kernels.engine import Engine
from tests.workerutil import series_data, small_model
from worker.compute import compute
from worker.encode import Encoder, Topics
from worker.events import Event
from worker.plan import Plan


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(load_model(small_model(tmp_path_factory.mktemp("model"))))


def _plan(data, steps: int) -> Plan:
    events = [[Event(sid, float(ts[j]), vals[j], None, 0, j) for j in range(steps)] for sid, ts, vals in data]
    return Plan([d[0] for d in data], list(range(len(data))), events)


def test_a_poisoned_row_restarts_alone_and_its_neighbours_are_unchanged(engine):
    data = series_data(4, 6, seed=3)
    warm = engine.new_states(4)
    for j in range(3):
        engine.advance(warm, np.array([d[2][j] for d in data]), np.array([d[1][j] for d in data]))
    enc = Encoder(Topics(), engine.model.version, engine.threshold)
    clean = compute(engine, enc, _plan(data, 6), warm)
    poisoned = warm.take(np.arange(4))
    poisoned.c[2, 0, 0] = np.inf
    got = compute(engine, enc, _plan(data, 6), poisoned)

    assert clean.restarted == [] and got.restarted == ["s-002"] and got.counts == [6, 6, 5, 6]
    (dead,) = got.failed
    assert dead.code == "failed" and dead.stream_id == "s-002" and dead.offset == 0
    assert got.states is not None and clean.states is not None
    for r in (0, 1, 3):  # the neighbours are bit-equal to the run without the poisoned row
        np.testing.assert_array_equal(got.states.h[r], clean.states.h[r])
    assert got.states.steps.tolist() == [9, 9, 5, 9] and np.isfinite(got.states.c).all()
    preds = [orjson.loads(v) for t, _, v in got.outputs if t == "predictions"]
    assert [p["step"] for p in preds if p["stream_id"] == "s-002"] == [1, 2, 3, 4, 5]
    assert len(preds) == 23 and got.applied == 23
    # the inputs were not touched: the caller can retry from them
    assert np.isinf(poisoned.c[2, 0, 0]) and (warm.steps == 3).all()


def test_nan_the_adaptation_layout_defines_is_kept_but_infinity_is_not(tmp_path):
    # The default model's adaptation vector uses NaN for "no forecast yet"; a step leaving
    # one must not count as broken, while an infinity there must (regression: every event of
    # the retrained default model was dead-lettered as failed).
    from kernels.engine import Outputs
    from worker.compute import finite_rows

    model = load_model("models/default")
    eng = Engine(model)
    st = eng.new_states(3)
    if st.adapt.shape[1] == 0:
        pytest.skip("the default model keeps no adaptation vector")
    fresh = eng.new_states(1)
    st.pred[:] = 0.0
    st.adapt[:, -1] = np.nan
    st.adapt[2, -1] = np.inf
    out = Outputs(np.zeros((3, 1)), np.zeros((3, 1)), np.zeros(3), np.zeros(3, bool), np.zeros(3, bool))
    assert finite_rows(st, out, fresh).tolist() == [True, True, False]
