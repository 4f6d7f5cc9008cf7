"""Selectors: hold device connections, decide check-ins locally, forward reports."""

from fedfleet.selector.actor import DeviceLink, ReportRejected, Selector, Task

__all__ = ["DeviceLink", "ReportRejected", "Selector", "Task"]
