"""The population gateway: one device endpoint per population, in front of its jobs' selectors.

See :mod:`fedfleet.gateway.app` (the service) and :mod:`fedfleet.gateway.routes` (how jobs'
selectors are announced, chosen and found again).
"""
