"""The device's side of a Secure Aggregation session, independent of the transport.

A :class:`SecureSession` turns a :class:`~fedfleet.device.runtime.SecureContribution` into the
sequence of calls of :data:`fedfleet.core.protocol.SECAGG_STEPS`: it sends its keys, then
alternates a poll for what the aggregator published (roster, inbox, survivors) with the message
that answers it (encrypted shares, the masked input, the unmasking shares). The embedded fleet
drives it with simulated delays, the HTTP fleet over the selector's ``/v1/secagg`` API; both
only carry bytes, every decision and all the cryptography live in :mod:`fedfleet.core.secagg`.
"""

from __future__ import annotations

import json
from typing import Any

from fedfleet.core.secagg import Inbox, Roster, SecAggClient, Survivors
from fedfleet.device.runtime import SecureContribution

__all__ = ["SecureSession"]

_NEXT_POLL = {"advertise": "roster", "shares": "inbox", "masked": "survivors"}


def _encode(message: Any) -> bytes:
    return json.dumps(message.to_dict(), separators=(",", ":")).encode()


class SecureSession:
    """One device's walk through the protocol: ``start()``, then ``answer()`` each poll.

    ``start`` returns the first call (``advertise`` and its body); after a send succeeds the
    caller polls :attr:`poll` until the aggregator returns a message, hands it to
    :meth:`answer` and sends what that returns. After the ``unmask`` send the session is
    :attr:`done`. Anything the core client refuses (a forged roster or ciphertext) raises
    :class:`~fedfleet.core.secagg.SecAggAbort`; the device then simply stops.
    """

    def __init__(self, contribution: SecureContribution) -> None:
        self.contribution = contribution
        self.client = SecAggClient(contribution.params, contribution.device_id)
        self.poll: str | None = None
        """The step to poll next (None before the first send and after the last)."""
        self.done = False

    def start(self) -> tuple[str, bytes]:
        return "advertise", _encode(self.client.advertise())

    def sent(self, step: str) -> None:
        """Record that ``step`` was accepted: the next poll, or the end of the session."""
        self.poll = _NEXT_POLL.get(step)
        self.done = step == "unmask"

    def answer(self, published: dict[str, Any]) -> tuple[str, bytes]:
        """The message answering what the poll of :attr:`poll` returned."""
        if self.poll == "roster":
            return "shares", _encode(self.client.share_keys(Roster.from_dict(published)))
        if self.poll == "inbox":
            masked = self.client.masked_input(Inbox.from_dict(published), self.contribution.vector)
            return "masked", masked.data
        if self.poll == "survivors":
            return "unmask", _encode(self.client.unmask(Survivors.from_dict(published)))
        raise RuntimeError(f"nothing to answer in state {self.poll!r}")
