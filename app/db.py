"""Engine construction. One engine per process, built in the app's lifespan."""

from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def json_serializer(value: Any) -> str:
    # orjson writes non-finite floats as null, so no JSON value can fail to store.
    return orjson.dumps(value).decode()


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=5,
        pool_pre_ping=True,
        json_serializer=json_serializer,
        json_deserializer=orjson.loads,
        connect_args={"timeout": 5, "server_settings": {"application_name": "coldmail-webhooks"}},
    )
