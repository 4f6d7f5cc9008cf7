"""Unit tests of a real device's eligibility signals, on temporary trees laid out like sysfs
and /proc, and of app-supplied overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfleet.device.signals import (
    ConditionsError,
    SystemSignals,
    is_idle,
    read_conditions_file,
    read_load,
    read_power,
)

pytestmark = pytest.mark.unit


def _supply(root: Path, name: str, **files: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(value + "\n")


def test_no_power_supply_class_means_mains_powered(tmp_path: Path) -> None:
    assert read_power(tmp_path / "missing").charging is True
    assert read_power(tmp_path / "missing").battery is None


def test_mains_only_machine_is_charging_without_battery(tmp_path: Path) -> None:
    _supply(tmp_path, "AC", type="Mains", online="0")
    power = read_power(tmp_path)
    assert power.charging is True
    assert power.battery is None


@pytest.mark.parametrize(
    ("ac_online", "status", "charging"),
    [
        ("0", "Discharging", False),
        ("1", "Discharging", True),
        ("0", "Charging", True),
        ("0", "Full", True),
        ("0", "Not charging", True),
        ("0", "Unknown", False),
    ],
)
def test_laptop_charging_from_adapter_or_battery_status(
    tmp_path: Path, ac_online: str, status: str, charging: bool
) -> None:
    _supply(tmp_path, "AC", type="Mains", online=ac_online)
    _supply(tmp_path, "BAT0", type="Battery", status=status, capacity="42")
    power = read_power(tmp_path)
    assert power.charging is charging
    assert power.battery == 42.0


def test_peripheral_battery_is_ignored_and_levels_average(tmp_path: Path) -> None:
    _supply(tmp_path, "hid-mouse", type="Battery", scope="Device", status="Discharging")
    assert read_power(tmp_path).charging is True  # only a mouse battery: mains powered
    _supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity="30")
    _supply(tmp_path, "BAT1", type="Battery", status="Discharging", capacity="50")
    _supply(tmp_path, "BAT2", type="Battery", status="Discharging", capacity="garbage")
    power = read_power(tmp_path)
    assert power.charging is False
    assert power.battery == 40.0


def test_usb_supply_online_counts_as_charging(tmp_path: Path) -> None:
    _supply(tmp_path, "usb", type="USB", online="1")
    _supply(tmp_path, "battery", type="Battery", status="Discharging", capacity="80")
    assert read_power(tmp_path).charging is True


def test_load_average_and_idle_threshold(tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.50 0.80 0.40 2/345 6789\n")
    assert read_load(loadavg) == 1.5
    assert read_load(tmp_path / "none") is None
    (tmp_path / "bad").write_text("x y z")
    assert read_load(tmp_path / "bad") is None
    assert is_idle(1.5, cpus=4, max_load=0.5) is True  # 1.5 < 2.0
    assert is_idle(1.5, cpus=2, max_load=0.5) is False  # 1.5 >= 1.0
    assert is_idle(1.5, cpus=2, max_load=0.5, extra_cpus=1.0) is True  # our own training
    assert is_idle(None, cpus=1, max_load=0.1) is True


def _signals(tmp_path: Path, load: str, **kwargs: object) -> SystemSignals:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "loadavg").write_text(f"{load} 0 0 1/1 1\n")
    _supply(tmp_path / "ps", "BAT0", type="Battery", status="Discharging", capacity="77")
    return SystemSignals(
        power_root=tmp_path / "ps",
        loadavg=tmp_path / "loadavg",
        cpus=2,
        **kwargs,  # type: ignore[arg-type]
    )


def test_system_signals_combine_os_and_configuration(tmp_path: Path) -> None:
    signals = _signals(tmp_path, "3.0", metered=True, max_load=0.5)
    c = signals()
    assert (c.charging, c.idle, c.unmetered) == (False, False, False)
    assert signals.battery == 77.0
    assert _signals(tmp_path / "b", "0.2")().unmetered is True
    assert _signals(tmp_path / "c", "0.2")().idle is True


def test_busy_allowance_only_while_training(tmp_path: Path) -> None:
    signals = _signals(tmp_path, "1.2", max_load=0.5)  # threshold 1.0 on two CPUs
    assert signals().idle is False
    assert signals(busy=True).idle is True


def test_conditions_file_overrides_each_key_and_is_reread(tmp_path: Path) -> None:
    conditions = tmp_path / "conditions.json"
    conditions.write_text(json.dumps({"charging": True, "idle": True}))
    signals = _signals(tmp_path, "9.0", metered=True, overrides=conditions)
    c = signals()
    assert (c.charging, c.idle, c.unmetered) == (True, True, False)
    conditions.write_text(json.dumps({"unmetered": True}))
    c = signals()
    assert (c.charging, c.idle, c.unmetered) == (False, False, True)


def test_app_callable_overrides(tmp_path: Path) -> None:
    state = {"charging": False}
    signals = _signals(tmp_path, "0.0", overrides=lambda: state)
    assert signals().charging is False
    state["charging"] = True
    assert signals().charging is True


@pytest.mark.parametrize(
    "content",
    ["not json", "[true]", '{"charging": "yes"}', '{"battery": true}', '{"idle": 1}'],
)
def test_bad_conditions_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConditionsError, match="conditions file"):
        read_conditions_file(path)
    with pytest.raises(ConditionsError):
        read_conditions_file(tmp_path / "missing.json")


def test_max_load_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_load"):
        SystemSignals(max_load=0.0)
