"""The store contract, run against the in-memory store with a hand-driven clock."""

from __future__ import annotations

import pytest

from fedfleet.store.memory import MemoryStore
from tests.contract.store_contract import StoreContract

pytestmark = pytest.mark.contract


class TestMemoryStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.now = 1000.0
        self.store = MemoryStore(clock=lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
