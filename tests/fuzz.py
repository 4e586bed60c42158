"""How hard the property tests fuzz.

CI runs the default; a long run outside CI multiplies every property
test's examples, e.g. ``TORBRIDGE_FUZZ_SCALE=200 python -m pytest tests/core``.
"""

from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("TORBRIDGE_FUZZ_SCALE", "1")))


def examples(n: int) -> int:
    return n * SCALE
