"""`coldmail-webhooks simulate`: realistic, signed CMR traffic against a URL, with a report.

By default it tells app/simulation/story.py's story; with --events, --duration or
--single-mailbox it sends load: random whole orders until the count or time is reached.
Exit status 1 if any answer is not what the contract promises for what was sent.
"""

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from app.receiving import signing
from app.simulation import story, traffic

EXPECTED = {"processed", "duplicate", "ignored", "queued"}


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    processed_ids: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0


def standard_order(args: argparse.Namespace) -> list[dict[str, Any]]:
    success = traffic.mailbox_order_success(quantity=args.mailboxes_per_domain)
    data = success["data"]
    created = [
        traffic.mailbox_created(
            provider=random.choice(["GOOGLE", "MICROSOFT"]),
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain=data["domainName"],
            userId=data["userId"],
        )
        for _ in range(args.mailboxes_per_domain)
    ]
    box_id = created[0]["data"]["mailboxDetails"]["mailboxId"]
    update = traffic.mailbox_updated(box_id, {"firstName": random.choice(["Ann", "Bo", "Cy"])})
    return [success, *created, update]


def prewarmup_order(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = [f"{traffic.provider_id().lower()[:12]}.com" for _ in range(args.domains_per_prewarmup)]
    failed = [n for n in names if random.random() < args.failure_rate]
    ok = [n for n in names if n not in failed]
    order_id = traffic.provider_id()
    events = []
    if ok:
        events.append(
            traffic.prewarmup_success(
                order_id=order_id, domain_names=ok, per_domain=args.mailboxes_per_domain
            )
        )
    if failed:
        reasons = ["Pre-warmed mailboxes not available", "Insufficient wallet balance"]
        events.append(
            traffic.prewarmup_failed(
                order_id=order_id, failures={n: random.choice(reasons) for n in failed}
            )
        )
    return events


def orders(args: argparse.Namespace) -> Iterator[list[bytes]]:
    """Endless realistic orders, each whole: some shuffled, some deliveries sent twice."""
    weights = dict(part.split("=") for part in args.mix.split(","))
    kinds, shares = list(weights), [float(v) for v in weights.values()]
    while True:
        if args.single_mailbox:
            batch = [traffic.mailbox_created()]
        elif random.choices(kinds, shares)[0] == "prewarmup":
            batch = prewarmup_order(args)
        else:
            batch = standard_order(args)
        if random.random() < args.shuffle:
            random.shuffle(batch)
        bodies = []
        for payload in batch:
            bodies.append(orjson.dumps(payload))
            if random.random() < args.duplicates:
                bodies.append(bodies[-1])
        yield bodies


def whole_orders(
    source: Iterator[list[bytes]], limit: int | None, deadline: float | None
) -> Iterator[list[bytes]]:
    """Orders until `limit` deliveries or the deadline: never one cut in two."""
    sent = 0
    for batch in source:
        if limit is not None and sent >= limit:
            return
        if deadline is not None and time.perf_counter() >= deadline:
            return
        sent += len(batch)
        yield batch


def story_mode(args: argparse.Namespace) -> bool:
    return bool(args.story) or (
        args.events is None and args.duration is None and not args.single_mailbox
    )


def told(agencies: list[story.Agency]) -> list[list[bytes]]:
    """Each agency's deliveries in its story's order; the agencies side by side."""
    return [[orjson.dumps(payload) for payload in agency.sent] for agency in agencies]


async def send(
    client: aiohttp.ClientSession, args: argparse.Namespace, body: bytes, results: Results
) -> None:
    headers = {"content-type": "application/json"}
    if args.signing_key:
        headers |= signing.sign(args.signing_key, body)
    params = {"token": args.token} if args.token else None
    started = time.perf_counter()
    try:
        async with client.post(args.url, data=body, headers=headers, params=params) as response:
            status, text = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        results.statuses[type(error).__name__] += 1
        results.violations.append(f"transport error: {type(error).__name__}")
        return
    results.latencies.append(time.perf_counter() - started)
    answer = orjson.loads(text) if status == 200 else {}
    results.statuses[f"{status} {answer.get('status', '')}".strip()] += 1
    if status != 200 or answer.get("status") not in EXPECTED:
        results.violations.append(f"HTTP {status} for {orjson.loads(body)['event']}")
    elif answer["status"] == "processed":
        results.processed_ids[answer["eventId"]] += 1


async def simulate(args: argparse.Namespace) -> Results:
    results = Results()
    if story_mode(args):
        agencies = told(story.story())
        source: Iterator[list[bytes]] = iter(agencies)
        limit: int | None = None
        concurrency = len(agencies)
        args.total = sum(len(batch) for batch in agencies)
    else:
        source, concurrency = orders(args), args.concurrency
        limit = None if args.duration else (args.events or 1000)
        args.total = limit or 0
    deadline = time.perf_counter() + args.duration if args.duration else None
    batches = whole_orders(source, limit, deadline)

    async def sender(client: aiohttp.ClientSession) -> None:
        while (batch := next(batches, None)) is not None:
            for body in batch:
                await send(client, args, body, results)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        await until_listening(client, args.url, args.wait)
        progress = None if args.quiet else asyncio.create_task(show_progress(args, results))
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
        if progress:
            progress.cancel()
    results.elapsed = time.perf_counter() - results.started
    twice = [event_id for event_id, n in results.processed_ids.items() if n > 1]
    results.violations += [f"eventId {e} processed more than once" for e in twice]
    return results


async def until_listening(client: aiohttp.ClientSession, url: str, patience: float) -> None:
    """Wait until something answers at the service's address (any answer: `simulate`
    judges the deliveries), or `patience` seconds have passed: a `serve` prints its banner
    before it listens."""
    health = url.split("/webhooks/")[0] + "/healthz"
    deadline, said = time.monotonic() + patience, False
    while True:
        try:
            async with client.get(health) as response:
                await response.read()
                return
        except (aiohttp.ClientConnectionError, TimeoutError):
            if time.monotonic() >= deadline:
                return
            if not said:
                print(f"waiting up to {patience:.0f} s for {health} to answer", file=sys.stderr)
                said = True
            await asyncio.sleep(0.1)


async def show_progress(args: argparse.Namespace, results: Results) -> None:
    while True:
        done = sum(results.statuses.values())
        if args.duration:
            share = min(1.0, (time.perf_counter() - results.started) / args.duration)
        else:
            share = min(1.0, done / max(args.total, 1))
        bar = "#" * int(share * 30)
        print(f"\r[{bar:<30}] {done} sent", end="", file=sys.stderr, flush=True)
        await asyncio.sleep(0.25)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def summary(results: Results) -> dict[str, Any]:
    sent = sum(results.statuses.values())
    ms = [v * 1000 for v in results.latencies]
    return {
        "sent": sent,
        "by_status": dict(results.statuses),
        "events_per_second": round(sent / results.elapsed, 1) if results.elapsed else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms, default=0.0), 2),
        "violations": len(results.violations),
    }


def print_table(report: dict[str, Any]) -> None:
    print("\n" + f"{'events sent':22}{report['sent']}")
    for status, count in sorted(report["by_status"].items()):
        print(f"  {status:20}{count}")
    for key in ("events_per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms", "violations"):
        print(f"{key.replace('_', ' '):22}{report[key]}")


def what_to_fix(results: Results, args: argparse.Namespace) -> str | None:
    """The likeliest cause, when every delivery failed the same way."""
    statuses = set(results.statuses)
    if statuses and statuses <= {"ClientConnectorError", "ServerDisconnectedError"}:
        return f"nothing answers at {args.url}: is `coldmail-webhooks serve` running there?"
    if statuses == {"401"}:
        return (
            "every delivery was refused 401: --token must be one of the server's WEBHOOK_TOKENS"
            " and --signing-key its CMR_SIGNING_KEY (local mode prints the webhook URL with its"
            " token)"
        )
    if statuses == {"404"}:
        return f"{args.url} is not the webhook endpoint: it ends in /webhooks/cmr"
    return None


def run_simulation(args: argparse.Namespace) -> int:
    results = asyncio.run(simulate(args))
    report = summary(results)
    print_table(report)
    for violation in results.violations[:20]:
        print(f"contract violation: {violation}", file=sys.stderr)
    if hint := what_to_fix(results, args):
        print(f"what to fix: {hint}", file=sys.stderr)
    if args.json:
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if story_mode(args) and report["by_status"].get("200 processed"):
        dashboard = args.url.split("/webhooks/")[0] + "/ui"
        print(f"\nthe story of {len(story.CHAPTERS)} agencies is told; open {dashboard} for:")
        print(f"  {story.WHAT_TO_SEE}")
    return 1 if results.violations else 0
