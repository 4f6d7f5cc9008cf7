"""The state directory of ``fedfleet up --no-fleet``: one endpoint per population, kept."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedfleet.endpoint import EndpointError, load_or_create, parse_listen


def test_listen_addresses_parse_and_bad_ones_say_the_expected_form() -> None:
    assert parse_listen(None) is None
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", ":8080", "host:", "host:port", "h:70000"):
        with pytest.raises(EndpointError, match="HOST:PORT"):
            parse_listen(bad)


def test_the_first_job_creates_the_secret_and_later_jobs_keep_address_and_secret(
    tmp_path: Path,
) -> None:
    first = load_or_create(tmp_path / "s", "phones")
    assert first.host == "127.0.0.1" and first.port > 0
    assert len(first.secret) == 32
    assert stat.S_IMODE(first.secret_path.stat().st_mode) == 0o600
    written = first.write("tok")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(written.read_text()) == {
        "url": first.url,
        "population": "phones",
        "enrollToken": "tok",
    }
    again = load_or_create(tmp_path / "s", "phones")
    assert (again.url, again.secret) == (first.url, first.secret)
    moved = load_or_create(tmp_path / "s", "phones", ("127.0.0.5", 0))
    assert moved.host == "127.0.0.5" and moved.secret == first.secret


def test_a_directory_of_another_population_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    load_or_create(d, "phones").write("tok")
    with pytest.raises(EndpointError, match="serves population 'phones'"):
        load_or_create(d, "cars")
    (d / "endpoint.json").write_text("{not json")
    with pytest.raises(EndpointError, match="not readable JSON"):
        load_or_create(d, "phones")
    (d / "endpoint.json").unlink()
    (d / "population-secret").write_text("abcd\n")
    with pytest.raises(EndpointError, match="fewer than 16 bytes"):
        load_or_create(d, "phones")
    (d / "population-secret").write_text("not hex at all\n")
    with pytest.raises(EndpointError, match="as hex"):
        load_or_create(d, "phones")
