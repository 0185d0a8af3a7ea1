"""/docs served from the service itself: Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI
serves) from the fastapi-offline package's files, no CDN, and a Content-Security-Policy that
allows its own files and its one inline script, nothing else. Only those files are served
(no sample page of the Swagger UI distribution, which would fetch a third-party example)."""

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def csp_for(html: str) -> str:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def add_docs(app: FastAPI) -> None:
    """For an app made with docs_url=None."""
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon.png",
    )
    html = bytes(page.body).decode()
    headers = {"Content-Security-Policy": csp_for(html), "X-Content-Type-Options": "nosniff"}

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        return Response(html, media_type="text/html", headers=headers)

    # Swagger UI's JS and CSS, a favicon, and ReDoc's JS (unused); no HTML page
    swagger_ui = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui)), "docs-assets")
