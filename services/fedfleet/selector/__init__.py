"""Selectors: hold device connections, decide check-ins locally, forward reports."""

from fedfleet.selector.actor import DeviceLink, Forward, Selector

__all__ = ["DeviceLink", "Forward", "Selector"]
