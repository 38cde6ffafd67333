"""The error types of the state store.

The store never retries: it raises, and the caller's one retry policy decides.

- :class:`StateUnavailable`: transient, worth retrying (connection refused or reset, a round
  trip over its timeout, ``BUSY``/``LOADING``/``CLUSTERDOWN``/``TRYAGAIN``/``MASTERDOWN``, a
  failover in progress).
- :class:`StateAuthError`: permanent (wrong password or user, ``NOAUTH``): retrying never helps.
- :class:`StateNotFound`: the stream asked about has no state.
- :class:`StateError`: everything else that is deterministic (a bad argument, a server that
  refuses a command). One line that says what was expected and what came.

An unreadable stored hash is not an exception: :meth:`state.store.StateStore.load` reports it
per stream (``Loaded.unreadable``), so that only that stream's events are dead-lettered.
"""

from __future__ import annotations


class StateError(Exception):
    """A user-facing state store problem (printed as one line by the CLI)."""


class StateUnavailable(StateError):
    """Redis could not be reached or is not ready (transient: retry with backoff)."""


class StateAuthError(StateError):
    """Redis refused the credentials (permanent: fix the URL)."""


class StateNotFound(StateError):
    """No state is stored for the stream asked about."""
