"""The overview's delivery chart: stacked bars a minute by outcome, drawn server-side as
SVG paths (no script)."""

from datetime import datetime, timedelta
from typing import Any

from app.reading.queries.events import OUTCOMES


def chart(counts: dict[str, dict[datetime, int]], since: datetime) -> dict[str, Any]:
    """Stacked bars, one a minute, as one SVG path per outcome (drawn server-side)."""
    height, minutes = 120, 24 * 60
    totals = [
        sum(counts[o].get(since + timedelta(minutes=i), 0) for o in OUTCOMES)
        for i in range(minutes)
    ]
    peak = max(totals) or 1
    paths: dict[str, list[str]] = {outcome: [] for outcome in OUTCOMES}
    for i in range(minutes):
        at, base = since + timedelta(minutes=i), 0.0
        for outcome in OUTCOMES:
            n = counts[outcome].get(at, 0)
            if n:
                h = n / peak * height
                paths[outcome].append(f"M{i} {height - base - h:.1f}h1v{h:.1f}h-1z")
                base += h
    ticks = [
        {"x": i, "label": (since + timedelta(minutes=i)).strftime("%H:%M")}
        for i in range(0, minutes + 1, 180)
    ]
    return {
        "paths": {o: "".join(p) for o, p in paths.items()},
        "height": height,
        "width": minutes,
        "peak": peak,
        "ticks": ticks,
        "totals": {o: sum(counts[o].values()) for o in OUTCOMES},
    }
