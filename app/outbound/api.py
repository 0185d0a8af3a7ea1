"""The read API of the outbound side: `GET /api/v1/destinations` and
`GET /api/v1/destinations/{name}/messages`, same tokens and errors as every read route."""

from datetime import datetime
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


class Destination(resources.Resource):
    """A destination as declared (never its URL's path or query, which may hold a secret:
    only its host) and its state, shared by every replica."""

    name: str
    format: Literal["standard-webhooks", "slack"]
    events: list[str]
    user_ids: list[str] | None
    host: str | None
    circuit: Literal["closed", "open", "disabled"] = Field(
        description="open: failing, only a probe is sent until one succeeds; disabled: it "
        "answered 410 Gone"
    )
    failures: int = Field(description="Failed attempts in a row since the last success")
    backlog: int = Field(description="Messages waiting to be sent")
    oldest_at: datetime | None = Field(description="When the oldest waiting message was written")
    oldest_seconds: float
    dead_letters: int = Field(description="Messages whose retries are exhausted (replayable)")
    opened_at: datetime | None
    disabled_at: datetime | None
    last_attempt_at: datetime | None


class Message(resources.Resource):
    id: int
    webhook_id: str = Field(description="The `webhook-id` header, the same on every attempt")
    type: str
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="The next retry (pending messages)")
    last_attempt_at: datetime | None
    last_status: int | None = Field(description="The HTTP status of the last attempt, if any")
    last_error: str | None
    occurred_at: datetime
    created_at: datetime
    delivered_at: datetime | None


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


async def destinations_with_state(request: Request) -> list[Destination]:
    """Every declared destination with its state, in name order (the API and the page)."""
    given = {d.name: d for d in declared(request)}
    states = await queries.destination_states(request.app.state.read_engine, sorted(given))
    return [resource(given[state.name], state) for state in states]


def resource(destination: Any, state: queries.DestinationState) -> Destination:
    fields = {k: v for k, v in vars(state).items() if k != "name"}
    user_ids = sorted(destination.user_ids) if destination.user_ids is not None else None
    return Destination(
        name=destination.name,
        format=destination.format,
        events=list(destination.events),
        user_ids=user_ids,
        host=host_of(destination),
        **fields,
    )


@router.get("/destinations", summary="The outbound destinations: backlog, dead letters, circuit")
async def list_destinations(request: Request) -> resources.Page[Destination]:
    return resources.Page(items=await destinations_with_state(request), next_cursor=None)


async def destination_messages(
    request: Request, name: str, query: MessagesQuery
) -> resources.Page[Message]:
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
    items = [Message.model_validate(row._asdict()) for row in rows[: query.limit]]
    more = len(rows) > query.limit
    return resources.Page(items=items, next_cursor=str(items[-1].id) if more else None)


@router.get(
    "/destinations/{name}/messages",
    summary="A destination's messages, newest first: status, attempts, next retry",
    responses=ONE,
)
async def list_destination_messages(
    request: Request, name: DestinationName, query: Annotated[MessagesQuery, Query()]
) -> resources.Page[Message]:
    return await destination_messages(request, name, query)
