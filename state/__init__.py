"""Per-stream state in Redis (layout: docs/state.md and :mod:`state.codec`). No numba, no Faust.

API (async, redis-py)::

    from kernels.states import Positions
    from state.store import StateStore
    from state.errors import StateError, StateUnavailable, StateAuthError

    store = await StateStore.connect(url, model_version=model.version, num_layers=model.num_layers,
                                     hidden_size=model.hidden_size, input_size=model.input_size,
                                     ttl=settings.state_ttl, timeout=5.0, durability="none")
    loaded = await store.load(ids)          # one round trip -> state.loaded.Loaded
    loaded.states                           # kernels.states.StreamStates, row i = ids[i]
    loaded.positions                        # kernels.states.Positions (partition, offset, index, ts, event_id)
    loaded.found, loaded.other_model, loaded.fresh  # bool (n,)
    loaded.unreadable                       # list[str | None]: why a stored hash cannot be read
    saved = await store.save(ids, states, positions)   # one round trip, fenced -> state.saved.Saved
    saved.code / saved.applied / saved.refused
    store.counters()
    await store.get(stream_id)              # full decoded record (dict) or StateNotFound
    await store.list(pattern="*", limit=50) # summaries, most recently updated first
    await store.reset(stream_id)            # -> bool (existed)
    await store.close()

    from state.inspection import describe   # record -> JSON-ready dict (CLI --json, GET /streams/{id})

Modules: ``codec`` (keys, field encodings), ``loaded`` (rows -> Loaded, pure), ``saved`` (fence
codes), ``connection`` (redis-py client or RedisCluster, timeouts, typed errors),
``durability`` (WAIT/WAITAOF), ``store`` (the store), ``inspection`` (JSON view).
"""
