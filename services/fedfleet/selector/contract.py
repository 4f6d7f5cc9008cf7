"""The device API's OpenAPI declarations: credentials, every status, typed and binary bodies.

The routes in :mod:`fedfleet.selector.app` read their credentials and binary bodies from the
raw request (the gate checks them before any body is read, see :mod:`fedfleet.service.gate`),
so FastAPI cannot infer them from the handlers' signatures. This module says in the OpenAPI
document what the code does: which credential each route needs (``components.securitySchemes``),
every status a route answers — including the gate's refusals — with the body each carries,
the task description's typed ``task``/``plan``/``privacy`` objects, the binary report and
checkpoint bodies, and the Secure Aggregation messages. ``docs/device-protocol.md`` is the
prose version; ``tests/contract/test_device_openapi.py`` checks this document against a live
selector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from fedfleet.core.spec import ModelSpec, TaskSpec

__all__ = [
    "ABORT",
    "CHECKIN",
    "CHECKPOINT",
    "ENROLL",
    "RENEW",
    "REPORT",
    "SECAGG",
    "SECURITY_SCHEMES",
    "TASK",
    "Accepted",
    "Noted",
    "PrivacyDescription",
    "ReconnectWindow",
    "TaskDescription",
    "document",
]

# -- bodies ------------------------------------------------------------------------------------


class Problem(BaseModel):
    """An error: a short text that never echoes the request."""

    detail: str = Field(max_length=200)


class FieldProblem(BaseModel):
    loc: str = Field(description="Where, e.g. `body.charging` or `header.x-fedfleet-examples`.")
    msg: str


class ValidationProblem(BaseModel):
    """422: at most five fields named (never their values), or one sentence."""

    detail: list[FieldProblem] | str


class Waiting(BaseModel):
    """202: nothing to hand out yet; poll again."""

    detail: str


class ReconnectWindow(BaseModel):
    """410 on the task poll: the attempt ended before it started; come back in this window."""

    outcome: Literal["reconnect"]
    reconnect_after_s: float
    reconnect_within_s: float
    reason: str


class Accepted(BaseModel):
    status: Literal["accepted"]


class Noted(BaseModel):
    status: Literal["noted"]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local ``$defs`` references replaced by their definitions."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


_BUILTIN_CONFIG = _inline(ModelSpec.model_json_schema(by_alias=True))
_BUILTIN_CONFIG["title"] = "BuiltinModelConfig"
_BUILTIN_CONFIG["description"] = (
    "The config of `fedfleet.tasks.builtin:task`: `softmax` has weights `[W (inputs, classes), "
    "b (classes,)]`, `mlp` `[W1, b1, W2, b2, ...]` through ReLU layers of sizes `hidden`; the "
    "logits are `x @ W + b`."
)


class TaskDescription(BaseModel):
    """The computation a device runs; a device refuses a task it does not have."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(
        pattern=TaskSpec.model_json_schema()["properties"]["ref"]["pattern"],
        description="`package.module:attribute`; `fedfleet.tasks.builtin:task` is the built-in "
        "softmax/MLP.",
    )
    config: Annotated[
        dict[str, Any],
        WithJsonSchema(
            {
                "anyOf": [_BUILTIN_CONFIG, {"type": "object", "additionalProperties": True}],
                "description": "The task's settings: the built-in task's model, or whatever "
                "another task takes.",
            }
        ),
    ] = Field(default_factory=dict)


class PrivacyDescription(BaseModel):
    """What the device does to its update before it leaves the device (all of it, or abort)."""

    model_config = ConfigDict(extra="forbid")
    weight_cap: int = Field(
        ge=1, description="The update's weight is min(examples / weight_cap, 1)."
    )
    clip_norm: float | None = Field(
        None, gt=0, description="Clip the update's L2 norm (all arrays together) to this (DP)."
    )
    secure_aggregation: bool = Field(
        False, description="Send the update only masked, through `/v1/secagg` (no report)."
    )
    group_id: str = Field("", max_length=1024, description="The Secure Aggregation session.")
    min_group_size: int = Field(2, ge=2)
    threshold_fraction: float = Field(0.5, ge=0.5, lt=1.0)
    clip_range: float = Field(1.0, gt=0)
    ring_bits: Literal[32, 64] = 32
    metric_names: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Under Secure Aggregation: the device metrics carried inside the masked "
        "vector, two coordinates each, in this order (empty otherwise).",
    )
    metric_range: float = Field(
        1000.0,
        gt=0,
        description="Under Secure Aggregation: each carried metric is clipped to +-this.",
    )


# Secure Aggregation messages as they travel (fedfleet.core.secagg.wire); base64 for bytes,
# 132 hex digits for a share. Checked against the real messages by the unit tests.
_B64 = "standard base64"


class SecAggKeyAdvert(BaseModel):
    """`advertise` (send): the device's two X25519 public keys."""

    model_config = ConfigDict(extra="forbid")
    device_id: str
    c_pk: str = Field(description=f"32 bytes, {_B64}: shares dealt to this device use it")
    s_pk: str = Field(description=f"32 bytes, {_B64}: pairwise masks are agreed with it")


class SecAggRoster(BaseModel):
    """`roster` (poll): U1 sorted by id, the threshold and the fixed-point encoding."""

    model_config = ConfigDict(extra="forbid")
    group_id: str
    devices: list[tuple[str, str, str]] = Field(description="[device_id, c_pk, s_pk]")
    threshold: int
    vector_length: int
    ring_bits: Literal[32, 64]
    clip_range: float
    scale: float


class SecAggShareKeys(BaseModel):
    """`shares` (send): encrypted share pairs for every other member, commitments for all."""

    model_config = ConfigDict(extra="forbid")
    sender: str
    ciphertexts: dict[str, str] = Field(description=f"recipient -> nonce||AES-GCM, {_B64}")
    commitments: dict[str, str] = Field(description=f"holder -> 64 bytes, {_B64}")


class SecAggInbox(BaseModel):
    """`inbox` (poll): U2 and the ciphertexts dealt to this device."""

    model_config = ConfigDict(extra="forbid")
    recipient: str
    members: list[str]
    ciphertexts: dict[str, str] = Field(description=f"dealer -> ciphertext, {_B64}")


class SecAggSurvivors(BaseModel):
    """`survivors` (poll): who is in the sum (U3) and who dropped (U2 minus U3)."""

    model_config = ConfigDict(extra="forbid")
    survivors: list[str]
    dropped: list[str]


class SecAggUnmaskShares(BaseModel):
    """`unmask` (send): shares of the survivors' self-mask seeds and the dropped's keys."""

    model_config = ConfigDict(extra="forbid")
    device_id: str
    b_shares: dict[str, str] = Field(description="survivor -> share, 132 hex digits")
    s_shares: dict[str, str] = Field(description="dropped device -> share, 132 hex digits")


class SecAggTaken(BaseModel):
    """A send was taken (an empty object)."""

    model_config = ConfigDict(extra="forbid")


SECAGG_SENT: tuple[type[BaseModel], ...] = (SecAggKeyAdvert, SecAggShareKeys, SecAggUnmaskShares)
SECAGG_PUBLISHED: tuple[type[BaseModel], ...] = (SecAggRoster, SecAggInbox, SecAggSurvivors)

# -- credentials -------------------------------------------------------------------------------

SECURITY_SCHEMES: dict[str, Any] = {
    "deviceToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The device's credential from `POST /v1/enroll` (`v1.<payload>.<sig>`, "
        "signed, expiring, bound to the device named in `x-fedfleet-device` and the "
        "population; docs/device-protocol.md, 'Enrollment and credentials'), or a job's device "
        "token for simulated devices (opaque to the device).",
    },
    "enrollToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The population's enroll token (64 hex characters): it can only enroll "
        "new devices, whose ids the server picks.",
    },
    "deviceId": {
        "type": "apiKey",
        "in": "header",
        "name": "x-fedfleet-device",
        "description": "The device's id, `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`.",
    },
    "deviceIdQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "device_id",
        "description": "The device's id, on the task poll.",
    },
    "reportTicket": {
        "type": "apiKey",
        "in": "header",
        "name": "x-fedfleet-ticket",
        "description": "The ticket a selecting check-in issued, bound to the job, the round "
        "attempt in the path and the device (at most 128 characters).",
    },
}
_TOKEN: list[dict[str, list[str]]] = [{"deviceToken": [], "deviceId": []}]
_ENROLL_TOKEN: list[dict[str, list[str]]] = [{"enrollToken": []}]
_TICKET: list[dict[str, list[str]]] = [{"reportTicket": [], "deviceId": []}]
_TICKET_QUERY: list[dict[str, list[str]]] = [{"reportTicket": [], "deviceIdQuery": []}]

_DEVICE_HEADER = {
    "name": "x-fedfleet-device",
    "in": "header",
    "required": True,
    "description": "The device id the token was issued to (the check-in body's device_id must "
    "be the same).",
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
}
_BINARY = {"type": "string", "format": "binary"}
_ARRAYS = (
    "An array message (docs/device-protocol.md section 3): `FFA1`, u32 count, then per array "
    "u8 dtype, u8 ndim, u64 dims, zero padding to a 16-byte offset, little-endian C-order data."
)

# -- statuses ----------------------------------------------------------------------------------

Responses = dict[int | str, dict[str, Any]]


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
_GATE: Responses = {
    400: _problem("Malformed Content-Length."),
    413: _problem("The body is larger than this route takes (declared or streamed)."),
    422: {"model": ValidationProblem, "description": "A parameter or field is invalid."},
    431: _problem("More than 64 header lines or 16 KiB of headers."),
}
_UNAVAILABLE = {
    "model": Problem,
    "description": "The shared store (or the device's aggregator) is unreachable; retry after "
    "Retry-After seconds.",
    "headers": _RETRY_AFTER,
}
_BAD_TOKEN = {
    "model": Problem,
    "description": "Missing or invalid device token (or a token of another device).",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
}
_TOO_MANY = {
    "model": Problem,
    "description": "Rate limited: come back after Retry-After seconds.",
    "headers": _RETRY_AFTER,
}
_NOT_ENROLLING = "Enrollment is not enabled on this selector (it has no population secret)"
_NO_TICKET = _problem("`x-fedfleet-ticket` or the device id is missing.")
_BAD_TICKET = _problem("The ticket is not valid for this device and round.")

CHECKIN: dict[str, Any] = {
    "responses": {
        **_GATE,
        200: {
            "description": "A selection (`outcome: selected`, with `round_key`, `ticket`, "
            "`aggregator`) or a reconnect window (`outcome: reconnect`: come back at a random "
            "time between `reconnect_after_s` and `reconnect_within_s` from now)."
        },
        401: _BAD_TOKEN,
        413: _problem("The body exceeds 1024 bytes."),
        429: {
            **_TOO_MANY,
            "description": "A device with a population credential checked in more often than "
            "once a second (burst 5): come back after Retry-After seconds.",
        },
        503: _UNAVAILABLE,
    },
    "openapi_extra": {"security": _TOKEN, "parameters": [_DEVICE_HEADER]},
}
ENROLL: dict[str, Any] = {
    "responses": {
        **_GATE,
        201: {"description": "Enrolled: the new device's id and credential."},
        401: {**_BAD_TOKEN, "description": "Missing or invalid enroll token."},
        404: _problem(f"`unknown population` (the body names another one), or: {_NOT_ENROLLING}."),
        413: _problem("The body exceeds 1024 bytes."),
        429: {**_TOO_MANY, "description": "Too many enrollments on this selector (20/s, burst "
              "100): retry after Retry-After seconds."},
    },
    "openapi_extra": {"security": _ENROLL_TOKEN},
}  # fmt: skip
RENEW: dict[str, Any] = {
    "responses": {
        400: _GATE[400],
        431: _GATE[431],
        200: {"description": "A new credential for the same device (its lifetime restarts)."},
        401: {
            **_BAD_TOKEN,
            "description": "The credential is missing, expired, forged, of another device or "
            "population, or revoked: enroll again.",
        },
        404: _problem(_NOT_ENROLLING + "."),
        413: _problem("This route takes no body."),
        429: {**_TOO_MANY, "description": "Renewals count against the device's check-ins."},
        503: _UNAVAILABLE,
    },
    "openapi_extra": {"security": _TOKEN, "parameters": [_DEVICE_HEADER]},
}
TASK: dict[str, Any] = {
    "responses": {
        **_GATE,
        202: {"model": Waiting, "description": "Not configured yet: poll again at once."},
        401: _NO_TICKET,
        403: _BAD_TICKET,
        404: _problem("No selection held for this device and round: check in again."),
        410: {
            "model": ReconnectWindow,
            "description": "Released: the attempt ended before it started; honour the window "
            "and check in again.",
        },
        413: _problem("This route takes no body."),
    },
    "openapi_extra": {"security": _TICKET_QUERY},
}
CHECKPOINT: dict[str, Any] = {
    "responses": {
        **_GATE,
        200: {
            "description": "The global model at this version, float32 arrays in the task's "
            "weight order. " + _ARRAYS,
            "content": {"application/octet-stream": {"schema": _BINARY}},
            "headers": {
                "ETag": {"schema": {"type": "string"}, "description": '`"v<version>"`'},
                "Cache-Control": {"schema": {"type": "string"}},
            },
        },
        304: {"description": "Not modified (If-None-Match matched the version's ETag)."},
        401: _BAD_TOKEN,
        404: _problem("No such version (yet, or no longer)."),
        413: _problem("This route takes no body."),
        503: _UNAVAILABLE,
    },
    "openapi_extra": {"security": _TOKEN, "parameters": [_DEVICE_HEADER]},
}
_BINARY_REPORT = {
    "required": True,
    "description": "The update (new minus old weights, float32, in the task's weight order and "
    "shapes; clipped when the task's privacy says so). " + _ARRAYS,
    "content": {"application/octet-stream": {"schema": _BINARY}},
}
REPORT: dict[str, Any] = {
    "responses": {
        **_GATE,
        202: {"model": Accepted, "description": "Folded into the round; never report again."},
        401: _NO_TICKET,
        403: _BAD_TICKET,
        404: _problem("Unknown round or aggregator."),
        409: _problem(
            "The round is closed or full, this device already reported or aborted, or the job "
            "takes updates only through Secure Aggregation."
        ),
        413: _problem("The update exceeds maxUpdateBytes."),
        421: _problem("`x-fedfleet-aggregator` does not serve this round."),
        422: {
            "model": ValidationProblem,
            "description": "The update does not decode or does not fit the model (count, dtype, "
            "shapes, NaN/infinity); bad x-fedfleet-examples or x-fedfleet-metrics.",
        },
        503: _UNAVAILABLE,
    },
    "openapi_extra": {"security": _TICKET, "requestBody": _BINARY_REPORT},
}
SECAGG: dict[str, Any] = {
    "responses": {
        **_GATE,
        200: {
            "description": "A send was taken (`{}`), or a poll's published message: `roster` "
            "-> SecAggRoster, `inbox` -> SecAggInbox, `survivors` -> SecAggSurvivors."
        },
        202: {"model": Waiting, "description": "Not published yet: poll again."},
        401: _NO_TICKET,
        403: _problem("Invalid ticket, or a message naming another device than its sender."),
        404: _problem("Secure Aggregation is off for this job, or an unknown round."),
        409: _problem("Wrong phase, a duplicate message, or the round is full."),
        410: _problem("This device is no longer part of the session (or the group failed)."),
        413: _problem("The message exceeds maxUpdateBytes + 1 MiB."),
        421: _problem("`x-fedfleet-aggregator` does not serve this round."),
        503: _UNAVAILABLE,
    },
    "openapi_extra": {
        "security": _TICKET,
        "requestBody": {
            "required": False,
            "description": "The step's message: JSON (SecAggKeyAdvert, SecAggShareKeys, "
            "SecAggUnmaskShares) for advertise/shares/unmask; for `masked` the raw masked vector "
            "(vector_length little-endian uint32 or uint64 ring elements); empty for the polls "
            "roster, inbox, survivors. The server reads the bytes whatever the content type.",
            "content": {
                "application/octet-stream": {"schema": _BINARY},
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": f"#/components/schemas/{m.__name__}"} for m in SECAGG_SENT
                        ]
                    }
                },
            },
        },
    },
}
ABORT: dict[str, Any] = {
    "responses": {
        **_GATE,
        202: {"model": Noted, "description": "Recorded: no report is taken from this device."},
        401: _NO_TICKET,
        403: _problem("Invalid ticket, or device_id differs from x-fedfleet-device."),
        413: _problem("The body exceeds 1024 bytes."),
        503: _UNAVAILABLE,
    },
    "openapi_extra": {"security": _TICKET},
}


def document(app: FastAPI) -> None:
    """Add the security schemes and the Secure Aggregation messages to ``app``'s OpenAPI
    document (built once, on the first request for it)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {})
            components["securitySchemes"] = SECURITY_SCHEMES
            schemas = components.setdefault("schemas", {})
            documented: tuple[type[BaseModel], ...] = (*SECAGG_SENT, *SECAGG_PUBLISHED, SecAggTaken)
            for model in documented:
                schemas[model.__name__] = _inline(model.model_json_schema())
            secagg = schema["paths"]["/v1/secagg/{round_key}/{step}"]["post"]
            secagg["responses"]["200"]["content"] = {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": f"#/components/schemas/{m.__name__}"}
                            for m in documented[len(SECAGG_SENT) :]
                        ]
                    }
                }
            }
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
