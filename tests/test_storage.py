"""What dpokit writes: strict JSON (no NaN or Infinity), whole directories or none."""

from __future__ import annotations

import json
import math

from dpokit.storage import json_text


def test_json_text_writes_null_for_what_json_cannot_hold():
    value = {"mean": math.nan, "rows": [1.0, math.inf, {"x": -math.inf}], "ok": 0.5, "name": "nan"}
    text = json_text(value)
    assert json.loads(text) == {"mean": None, "rows": [1.0, None, {"x": None}], "ok": 0.5, "name": "nan"}
    assert "NaN" not in text and "Infinity" not in text
