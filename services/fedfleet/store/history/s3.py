"""Models in an S3-compatible bucket (AWS S3, MinIO, versitygw, Ceph RGW, ...).

A small client over httpx with AWS Signature Version 4 (path-style requests), enough for what
model storage needs: PUT, GET, DELETE and ListObjectsV2 of one bucket. Every PUT is signed with
the payload's SHA-256, so the server checks the bytes it received; a completed PUT is durable
(S3's contract) and only then is the version committed.

Credentials come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and
``AWS_SESSION_TOKEN`` if set): on Kubernetes the operator fills them from the Secret named by
``spec.checkpoints.storage.credentialsSecret``; they never appear in a location, a message or
the store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from fedfleet.store.history.base import ModelMissing, ModelStorageError, check_name, job_path

__all__ = ["S3Models", "credentials_from_env"]

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def credentials_from_env() -> tuple[str, str, str | None]:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ModelStorageError(
            "S3 model storage needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    return key, secret, os.environ.get("AWS_SESSION_TOKEN") or None


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class S3Models:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "fedfleet",
        endpoint: str | None = None,
        region: str = "us-east-1",
        credentials: tuple[str, str, str | None] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = (endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
        self.region = region
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            raise ValueError(f"S3 endpoint {self.endpoint!r} must be http(s)://host[:port]")
        self._host = parts.netloc
        self._key, self._secret, self._token = credentials or credentials_from_env()
        self._http = httpx.Client(timeout=timeout)

    def location(self) -> dict[str, Any]:
        return {
            "kind": "s3",
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self.endpoint,
            "region": self.region,
        }

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    # -- signing ----------------------------------------------------------------------------------
    def _request(
        self, method: str, key: str = "", *, query: dict[str, str] | None = None, body: bytes = b""
    ) -> httpx.Response:
        path = "/" + quote(self.bucket + ("/" + key if key else ""), safe="/-_.~")
        query = query or {}
        canonical_query = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
        )
        now = datetime.now(UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest()
        headers = {"host": self._host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
        if self._token:
            headers["x-amz-security-token"] = self._token
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                path,
                canonical_query,
                "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                signed,
                payload,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key_ = _hmac(("AWS4" + self._secret).encode(), day)
        for part in (self.region, "s3", "aws4_request"):
            key_ = _hmac(key_, part)
        signature = hmac.new(key_, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._key}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature}"
        )
        url = self.endpoint + path + (f"?{canonical_query}" if canonical_query else "")
        try:
            return self._http.request(method, url, headers=headers, content=body)
        except httpx.HTTPError as exc:
            raise ModelStorageError(f"{self.describe()}: {method} failed: {exc}") from exc

    def _fail(self, what: str, response: httpx.Response) -> ModelStorageError:
        code = ""
        try:
            found = ET.fromstring(response.content).find("Code")
            code = f" {found.text}" if found is not None and found.text else ""
        except ET.ParseError:
            pass
        return ModelStorageError(f"{self.describe()}: {what}: HTTP {response.status_code}{code}")

    # -- objects ----------------------------------------------------------------------------------
    def _object(self, job: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, job_path(job), check_name(name)) if p)

    def create_bucket(self) -> None:
        """Create the bucket (set-up and tests; fedfleet expects it to exist)."""
        r = self._request("PUT")
        if r.status_code not in (200, 409):
            raise self._fail("create bucket", r)

    def put(self, job: str, name: str, data: bytes) -> None:
        r = self._request("PUT", self._object(job, name), body=data)
        if r.status_code != 200:
            raise self._fail(f"PUT {job}/{name}", r)

    def get(self, job: str, name: str) -> bytes:
        r = self._request("GET", self._object(job, name))
        if r.status_code == 404:
            raise ModelMissing(f"no {job}/{name} in {self.describe()}")
        if r.status_code != 200:
            raise self._fail(f"GET {job}/{name}", r)
        return r.content

    def delete(self, job: str, name: str) -> None:
        r = self._request("DELETE", self._object(job, name))
        if r.status_code not in (200, 204, 404):
            raise self._fail(f"DELETE {job}/{name}", r)

    def names(self, job: str) -> list[str]:
        head = "/".join(p for p in (self.prefix, job_path(job)) if p) + "/"
        found: list[str] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": head}
            if token:
                query["continuation-token"] = token
            r = self._request("GET", query=query)
            if r.status_code != 200:
                raise self._fail(f"list {job}", r)
            root = ET.fromstring(r.content)
            for item in root.iter(f"{_NS}Contents"):
                key = item.findtext(f"{_NS}Key") or ""
                if key.startswith(head) and "/" not in key[len(head) :]:
                    found.append(key[len(head) :])
            token = root.findtext(f"{_NS}NextContinuationToken") or ""
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                return sorted(found)

    def delete_job(self, job: str) -> int:
        names = self.names(job)
        for name in names:
            self.delete(job, name)
        return len(names)

    def close(self) -> None:
        self._http.close()
