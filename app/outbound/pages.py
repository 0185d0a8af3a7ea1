"""The dashboard's outbound pages: the destinations, and one page per destination with
its recent attempts and its dead letters (the read API's own queries)."""

from fastapi import APIRouter, Depends, Request, Response

from app.outbound import queries
from app.outbound.api import declared, destinations_with_state
from app.reading import ui
from app.reading.sessions import signed_in

pages = APIRouter(prefix="/ui", include_in_schema=False, dependencies=[Depends(signed_in)])
SHOWN = 50  # attempts, and dead letters, on a destination's page


@pages.get("/destinations")
async def destinations_page(request: Request) -> Response:
    destinations = await destinations_with_state(request)
    return ui.page(request, "destinations.html", destinations=destinations)


@pages.get("/destinations/{name}")
async def destination_page(request: Request, name: str) -> Response:
    if name not in {d.name for d in declared(request)}:
        raise ui.PageError(404, "No such destination.")
    [destination] = [d for d in await destinations_with_state(request) if d.name == name]
    engine = request.app.state.read_engine
    attempts = await queries.recent_attempts(engine, name, limit=SHOWN)
    dead = await queries.messages(engine, name, status="dead", before=2**63 - 1, limit=SHOWN)
    return ui.page(
        request, "destination.html", destination=destination, attempts=attempts, dead=dead
    )
