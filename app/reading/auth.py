"""Who may read: the bearer tokens of OPS_API_TOKENS and CREDENTIALS_API_TOKENS."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.crypto import token_matches
from app.errors import ApiError

bearer = HTTPBearer(
    auto_error=False, description="A token from OPS_API_TOKENS or CREDENTIALS_API_TOKENS"
)

UNAUTHORIZED = ApiError(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})


async def ops_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    settings = request.app.state.settings
    token = credentials.credentials if credentials else None
    allowed = settings.ops_token_list + settings.credentials_token_list
    if not token_matches(token, allowed):
        raise UNAUTHORIZED
    assert token is not None
    # who reads, as the dashboard's sessions know it: searches are counted per token
    request.state.signed_in = (await request.app.state.hashing.get()).fingerprint(token)
    return token


def credentials_token(request: Request, token: Annotated[str, Depends(ops_token)]) -> str:
    if not token_matches(token, request.app.state.settings.credentials_token_list):
        raise ApiError(403, {"error": "forbidden"})
    return token
