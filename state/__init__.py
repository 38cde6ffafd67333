"""Per-stream state in Redis (contract layout: see :mod:`state.codec` and the README).

API (async, ``redis.asyncio`` + hiredis)::

    from state.store import StateStore, Loaded
    from state.errors import StateError

    store = await StateStore.connect(url, model_version=model.version, num_layers=model.num_layers,
                                     hidden_size=model.hidden_size, input_size=model.input_size,
                                     ttl=settings.state_ttl, policy=settings.model_policy)
    loaded = await store.load(ids)          # one round trip -> Loaded
    loaded.states                           # kernels.engine.StreamStates, row i = ids[i]
    loaded.partition / .offset / .index     # int64 (n,), -1 where no state is stored
    loaded.ts                               # float64 (n,), NaN where no state is stored
    loaded.event_id                         # list[str | None]: last applied event_id
    loaded.found, loaded.reset, loaded.fresh  # bool (n,)
    applied = await store.save(ids, states, partitions, offsets, indexes, ts, event_ids)
                                            # one round trip, fenced -> bool (n,)
    store.counters()                        # loads, resets, applied, stale, duplicates, retried
    await store.get(stream_id)              # full decoded record (dict) or StateError
    await store.list(pattern="*", limit=50) # summaries, most recently updated first
    await store.reset(stream_id)            # -> bool (existed)
    await store.close()

    from state.inspection import describe   # record -> JSON-ready dict (CLI --json, GET /streams/{id})

Redis Cluster: the same URL form naming any node; ``connect`` sees ``cluster_enabled:1`` in
``INFO cluster`` and splits every batch by primary (see :mod:`state.cluster`).
"""
