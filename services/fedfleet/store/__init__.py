"""Shared state of a job: one Protocol, an in-memory and a Redis implementation."""

from fedfleet.store.base import (
    Checkpoint,
    ConflictError,
    FencedError,
    Store,
    StoreUnavailable,
)
from fedfleet.store.factory import open_store

__all__ = [
    "Checkpoint",
    "ConflictError",
    "FencedError",
    "Store",
    "StoreUnavailable",
    "open_store",
]
