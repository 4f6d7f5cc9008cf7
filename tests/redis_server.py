"""A real ``redis-server`` on a free loopback port, for the contract, integration and chaos tiers.

Tests run the very launcher ``fedfleet up`` runs (:mod:`fedfleet.redis_server`): each server
gets its own port, working directory and config file (the password stays out of ``ps``), is
durable unless told otherwise, and can be stopped and started again on the same port to play
a Redis restart.
"""

from __future__ import annotations

from fedfleet.redis_server import RedisServer, RedisServerError, free_port

__all__ = ["RedisServer", "RedisServerError", "free_port"]
