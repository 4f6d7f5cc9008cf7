"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious variant, as pure state.

One :class:`SecAggServer` per aggregator group and one :class:`SecAggClient` per device run the
four rounds of the paper's protocol; they exchange the frozen message dataclasses below and
never touch a socket, a clock or a store, so the same code runs embedded, behind HTTP or in
tests. Every message has ``to_dict``/``from_dict`` (JSON-safe: bytes as base64, shares as
fixed-width hex); ``from_dict`` parses untrusted input strictly and bounds every size.

The rounds, with ``U1 ⊇ U2 ⊇ U3`` the devices still present after each:

0. **AdvertiseKeys.** Each device sends two X25519 public keys (:class:`KeyAdvert`): ``c`` to
   encrypt the shares it deals, ``s`` to agree pairwise masks. The server closes the round
   into a :class:`Roster` (``U1`` sorted by device id, threshold ``t``, fixed-point scale).
1. **ShareKeys.** Each device draws a self-mask seed ``b_u`` and ``t``-of-``n`` Shamir-shares
   ``b_u`` and its raw ``s`` private key over GF(2^521 - 1) (evaluation point = 1-based roster
   index). The share pair for ``v`` travels AES-GCM encrypted under
   HKDF(X25519(c_sk_u, c_pk_v)), with group and both ids in the key derivation and the
   associated data; the server only routes it. Beside it go SHA-256 commitments to every
   share (the dealer's own included, bound to group and roster indices), so that the server
   can refuse a wrong revealed share; shares are uniform 521-bit values, so a commitment hides
   its share.
2. **MaskedInputCollection.** Each device of ``U2`` quantizes its clipped vector into
   Z_{2^ring_bits} and sends ``y_u = q_u + PRG(b_u) + sum_v ±PRG(s_uv)`` (``+`` when
   ``u < v``) with ``s_uv`` agreed by X25519 with every other ``v`` in ``U2``. The server folds
   each ``y_u`` into one running sum as it arrives and keeps nothing else of it.
3. **Unmasking.** Each device of ``U3`` reveals its shares of ``b_v`` for the survivors and of
   ``s_sk_v`` for the dropped (``U2 \\ U3``), once. From any ``t`` responders the server
   rebuilds those secrets, removes the self masks of survivors and the dropped devices' pairwise
   masks from the sum, and decodes it: the sum of the ``U3`` devices' clipped inputs.

What keeps an individual input hidden from an honest-but-curious server: a device never reveals
both kinds of share for one device (it unmasks once, for a disjoint survivors/dropped split),
and the server refuses a message carrying the wrong kind, so it never receives an s-share of a
survivor nor a b-share of a dropped device (fewer than ``t`` colluding devices cannot make up
the difference).
``t = floor(threshold_fraction * n) + 1`` with ``threshold_fraction`` in [0.5, 1) is a strict
majority of ``U1``. Active attacks (a server lying about who dropped, a device dealing
inconsistent shares) are out of scope: that is the malicious variant with consistency checks
and signatures, which this module does not implement. A reconstructed ``s`` key is checked
against its advertised public key; a reconstructed ``b`` cannot be checked.

Fixed point: each coordinate is clipped to ``[-clip_range, clip_range]`` and rounded to an
integer of magnitude at most ``K = floor((2^(ring_bits-1) - 1) / n)`` (``scale = K /
clip_range``), so a sum of ``n`` of them never wraps; the decoded sum is within ``n / (2 *
scale)`` of the true sum per coordinate (with ``ring_bits=64`` the float64 conversion, ~1e-16
relative, dominates). Pseudo-random expansion is AES-256-CTR from a zero counter; every AES key
comes out of HKDF-SHA256 with a purpose label, the group and the ids, so no key expands two
different streams (both ends of a pair expand the same mask, which is the point). Device ids
compare as Python strings (code-point order).

Costs for a group of n with vectors of m: each device does O(n) key agreements and O(n * m)
keystream, plus O(n * t) field operations to deal its shares; the server holds O(n^2)
ciphertexts and commitments until round 2 closes and O(m) for the sum, and unmasking costs it
O(t^2 + n * t) field operations plus one keystream per survivor and per (dropped, survivor)
pair: dropouts between rounds 1 and 2 are the expensive case.
"""

from __future__ import annotations

from fedfleet.core.secagg.crypto import (
    dequantize,
    fixed_point_scale,
    lagrange_at_zero,
    prg,
    quantize,
    shamir_share,
)
from fedfleet.core.secagg.parties import (
    SecAggClient,
    SecAggServer,
    ServerPhase,
)
from fedfleet.core.secagg.wire import (
    FIELD_PRIME,
    KEY_BYTES,
    MAX_CIPHERTEXT_BYTES,
    MAX_GROUP_SIZE,
    MAX_ID_BYTES,
    MAX_VECTOR_LENGTH,
    REASON_DUPLICATE,
    REASON_FULL,
    REASON_KEY,
    REASON_KIND,
    REASON_LENGTH,
    REASON_MALFORMED,
    REASON_PHASE,
    REASON_RECIPIENTS,
    REASON_REPLAYED_KEY,
    REASON_SHARE,
    REASON_SHARES,
    REASON_UNKNOWN,
    SHARE_BYTES,
    Inbox,
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggAbort,
    SecAggError,
    SecAggFailed,
    SecAggParams,
    SecAggRejected,
    SecAggResult,
    ShareKeys,
    Survivors,
    UnmaskShares,
)

__all__ = [
    "FIELD_PRIME",
    "KEY_BYTES",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_GROUP_SIZE",
    "MAX_ID_BYTES",
    "MAX_VECTOR_LENGTH",
    "REASON_DUPLICATE",
    "REASON_FULL",
    "REASON_KEY",
    "REASON_KIND",
    "REASON_LENGTH",
    "REASON_MALFORMED",
    "REASON_PHASE",
    "REASON_RECIPIENTS",
    "REASON_REPLAYED_KEY",
    "REASON_SHARE",
    "REASON_SHARES",
    "REASON_UNKNOWN",
    "SHARE_BYTES",
    "Inbox",
    "KeyAdvert",
    "MaskedInput",
    "Roster",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggFailed",
    "SecAggParams",
    "SecAggRejected",
    "SecAggResult",
    "SecAggServer",
    "ServerPhase",
    "ShareKeys",
    "Survivors",
    "UnmaskShares",
    "dequantize",
    "fixed_point_scale",
    "lagrange_at_zero",
    "prg",
    "quantize",
    "shamir_share",
]
