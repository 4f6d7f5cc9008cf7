"""Device side: Example Store, FL runtime and the fleet simulator."""
