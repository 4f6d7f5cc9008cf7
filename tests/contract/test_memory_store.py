"""The store contract, run against the in-memory store with a hand-driven clock."""

from __future__ import annotations

import pytest

from fedfleet.store.memory import MemoryStore
from tests.contract.store_contract import StoreContract

pytestmark = pytest.mark.contract


class TestMemoryStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.clock = 1000.0
        self.store = MemoryStore(clock=lambda: self.clock)

    def advance(self, seconds: float) -> None:
        self.clock += seconds

    def now(self) -> float:
        return self.clock
