"""The delivery chart: stacked bars by outcome, one a bucket (a minute, an hour, four
hours), and a band under them where deliveries waited in the spool; drawn server-side as
SVG paths (no script)."""

from datetime import datetime, timedelta
from typing import Any

from app.reading.queries.deliveries import OUTCOMES, Counts

WIDTH, HEIGHT, BAND = 1440, 120, 8  # the band: deliveries that waited in the spool
TICKS = {  # bucket size: (buckets between ticks, label)
    timedelta(minutes=1): (180, "%H:%M"),
    timedelta(hours=1): (24, "%a %d"),
    timedelta(hours=4): (30, "%b %d"),
}


def chart(counts: Counts, since: datetime, step: timedelta, buckets: int) -> dict[str, Any]:
    w = WIDTH / buckets
    at = [since + i * step for i in range(buckets)]
    totals = [sum(counts[o].get(t, 0) for o in OUTCOMES) for t in at]
    peak = max(totals) or 1
    paths: dict[str, list[str]] = {outcome: [] for outcome in OUTCOMES}
    spooled: list[str] = []
    for i, t in enumerate(at):
        base = 0.0
        for outcome in OUTCOMES:
            if n := counts[outcome].get(t, 0):
                h = n / peak * HEIGHT
                paths[outcome].append(f"M{i * w:g} {HEIGHT - base - h:.1f}h{w:g}v{h:.1f}h{-w:g}z")
                base += h
        if counts["spooled"].get(t, 0):
            spooled.append(f"M{i * w:g} {HEIGHT + 3}h{w:g}v{BAND}h{-w:g}z")
    every, label = TICKS[step]
    ticks = [
        {"x": i * w, "label": (since + i * step).strftime(label)}
        for i in range(0, buckets + 1, every)
    ]
    return {
        "paths": {o: "".join(p) for o, p in paths.items()},
        "spooled": "".join(spooled),
        "height": HEIGHT,
        "band": BAND,
        "width": WIDTH,
        "peak": peak,
        "ticks": ticks,
        "totals": {o: sum(counts[o].values()) for o in OUTCOMES},
        "spooled_total": sum(counts["spooled"].values()),
        "per": {timedelta(minutes=1): "minute", timedelta(hours=1): "hour"}.get(step, "4 hours"),
    }
