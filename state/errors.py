"""The one error type of the state store that users see.

Unknown stream, unreachable Redis, wrong password, a state saved by another model version
(with policy ``refuse``) or a corrupt hash: one line that says what was expected and what came.
"""

from __future__ import annotations


class StateError(Exception):
    """A user-facing state store problem (printed as one line by the CLI)."""


class StateUnavailable(StateError):
    """Redis could not be reached (after retries): worth waiting for, not a bad request."""


class StateNotFound(StateError):
    """No state is stored for the stream asked about."""
