"""A linear-regression task for fedfleet, in plain numpy (see ``linreg.task``)."""
