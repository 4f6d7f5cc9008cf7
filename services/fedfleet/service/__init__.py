"""What every fedfleet service shares: settings, keys, ops routes, logging, the tick thread."""
