"""``python -m fedfleet_operator``: the same as ``fedfleet operator``."""

from __future__ import annotations

import sys

from fedfleet_operator.main import main

sys.exit(main())
