"""The read API of the outbound side: `GET /api/v1/destinations` and
`GET /api/v1/destinations/{name}/messages`, same tokens and errors as every read route."""

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.errors import NotFound
from app.outbound import queries
from app.reading import resources
from app.reading.api import ONE, one_value_each
from app.reading.auth import ops_token

router = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(ops_token), Depends(one_value_each)],
    tags=["read API"],
    responses=resources.errors(401, 422, 500, 503),
)
MAX_ID = 2**63 - 1
DestinationName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class MessagesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    limit: int = Field(50, ge=1, le=500, description="Page size, at most 500")
    status: Literal["pending", "delivered", "dead"] | None = None
    cursor: str | None = Field(
        None, pattern=r"^[0-9]{1,18}$", description="`nextCursor` of the previous page"
    )


def declared(request: Request) -> list[Any]:
    """The destinations of DESTINATIONS_FILE this process runs with."""
    return list(getattr(request.app.state, "destinations", None) or [])


def host_of(destination: Any) -> str | None:
    return urlsplit(destination.url).hostname if destination.url else None


async def destinations_with_state(request: Request) -> list[resources.Destination]:
    """Every declared destination with its state, in name order (the API and the page)."""
    given = {d.name: d for d in declared(request)}
    states = await queries.destination_states(request.app.state.read_engine, sorted(given))
    return [resource(given[state.name], state) for state in states]


def resource(destination: Any, state: queries.DestinationState) -> resources.Destination:
    fields = {k: v for k, v in vars(state).items() if k != "name"}
    user_ids = sorted(destination.user_ids) if destination.user_ids is not None else None
    return resources.Destination(
        name=destination.name,
        format=destination.format,
        events=list(destination.events),
        user_ids=user_ids,
        host=host_of(destination),
        **fields,
    )


@router.get("/destinations", summary="The outbound destinations: backlog, dead letters, circuit")
async def list_destinations(request: Request) -> resources.Page[resources.Destination]:
    return resources.Page(items=await destinations_with_state(request), next_cursor=None)


async def destination_messages(
    request: Request, name: str, query: MessagesQuery
) -> resources.Page[resources.OutboundMessage]:
    if name not in {d.name for d in declared(request)}:
        raise NotFound()
    before = int(query.cursor) if query.cursor else MAX_ID
    rows = await queries.messages(
        request.app.state.read_engine,
        name,
        status=query.status,
        before=before,
        limit=query.limit + 1,
    )
    items = [resources.OutboundMessage.model_validate(row._asdict()) for row in rows[: query.limit]]
    more = len(rows) > query.limit
    return resources.Page(items=items, next_cursor=str(items[-1].id) if more else None)


@router.get(
    "/destinations/{name}/messages",
    summary="A destination's messages, newest first: status, attempts, next retry",
    responses=ONE,
)
async def list_destination_messages(
    request: Request, name: DestinationName, query: Annotated[MessagesQuery, Query()]
) -> resources.Page[resources.OutboundMessage]:
    return await destination_messages(request, name, query)
