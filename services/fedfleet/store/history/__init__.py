"""Model history: every kept checkpoint of a job, in Redis, a directory or an S3 bucket."""

from fedfleet.store.history.base import ModelMissing, ModelRef, ModelStorage, ModelStorageError
from fedfleet.store.history.keeper import (
    checkpoint_bytes,
    commit_model,
    open_models,
    read_index,
    select_model,
    storage_for,
    update_history,
)

__all__ = [
    "ModelMissing",
    "ModelRef",
    "ModelStorage",
    "ModelStorageError",
    "checkpoint_bytes",
    "commit_model",
    "open_models",
    "read_index",
    "select_model",
    "storage_for",
    "update_history",
]
