"""The one error type of the state store that users see.

Unknown stream, unreachable Redis, wrong password, a state saved by another model version
(with policy ``refuse``) or a corrupt hash: one line that says what was expected and what came.
"""

from __future__ import annotations


class StateError(Exception):
    """A user-facing state store problem (printed as one line by the CLI)."""
