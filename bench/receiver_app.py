"""A local receiver for the dispatch benchmark (bench/outbound.py): answers 204 at once and
counts requests and distinct webhook-ids (a message sent twice would show)."""

from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()
seen: set[str] = set()
heard = [0]


@app.post("/hook")
async def hook(request: Request) -> Response:
    heard[0] += 1
    seen.add(request.headers.get("webhook-id", ""))
    return Response(status_code=204)


@app.get("/count")
async def count() -> dict[str, int]:
    return {"requests": heard[0], "unique": len(seen)}
