"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def summary(samples: list[float], scale: float = 1.0) -> dict[str, float]:
    s = sorted(x * scale for x in samples)
    return {"median": round(statistics.median(s), 3), "p95": round(s[int(len(s) * 0.95) - 1], 3),
            "min": round(s[0], 3), "n": len(s)}


def save(name: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))
