"""The HTTP ceiling: FastAPI under the same uvicorn settings, parsing the same body into a
small pydantic model, and answering as the service would, with no database and no crypto."""

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict


class Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")
    event: str
    eventId: str
    data: dict[str, object]


app = FastAPI()


@app.post("/webhooks/cmr")
async def receive(request: Request) -> Response:
    envelope = Envelope.model_validate_json(await request.body())
    body = {"status": "processed", "eventId": envelope.eventId, "event": envelope.event}
    return Response(orjson.dumps(body), media_type="application/json")
