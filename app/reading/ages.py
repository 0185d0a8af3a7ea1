"""How long ago a time was, in words, for the dashboard's pages: `ago` beside each time
shown (the exact time on hover), `counted` for a kept count (the overview's incomplete
orders). Apart from ui.py so that the queries below it can say it too."""

from datetime import UTC, datetime


def seconds_since(value: datetime) -> float:
    """Negative for a time still to come."""
    return (datetime.now(UTC) - value).total_seconds()


def ago(value: datetime) -> str:
    """ "3 min ago" or "in 5 d": how far a time is from now, roughly, in its largest unit."""
    seconds = seconds_since(value)
    span = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if span >= size or unit == "s":
            amount = f"{int(span // size)} {unit}"
            break
    return f"in {amount}" if seconds < 0 else f"{amount} ago"


def counted(at: datetime) -> str:
    """ "counted 90 s ago": a kept count's age, in seconds for its first two minutes."""
    seconds = int(seconds_since(at))
    if seconds < 1:
        return "counted just now"
    return f"counted {seconds} s ago" if seconds < 120 else f"counted {seconds // 60} min ago"
