"""HTTP routes, added to the WebUI's FastAPI app from `on_app_started` (so they exist with --nowebui).

    POST /inplace-lora/v1/train    {"train_data_dir": "...", "preset": "sd15_style", "lora_rank": 8, ...,
                                    "preview_prompt": "...", "preview_strengths": [0, 0.8]}
                                   -> 200 {"id", "status", "lora_name", ...} | 400 {"error"} | 409 busy
    POST /inplace-lora/v1/stop     -> {"stopping": true|false}  (keeps the last checkpoint)
    GET  /inplace-lora/v1/status   -> the job's progress, losses, messages and files
    GET  /inplace-lora/v1/presets  -> {"presets": {name: fields}}
    POST /inplace-lora/v1/caption  {"folder", "captioner", "mode", "trigger"} -> {"summary"}
    POST /inplace-lora/v1/check    {"train_data_dir", ...} -> {"report"}

The handlers are plain functions returning (status code, JSON body) so they are tested without a
server; `register` wraps them for FastAPI. With --api-auth the routes ask for the same HTTP Basic
credentials as /sdapi/v1 (they take folder paths and write files).
"""

from __future__ import annotations

import logging

from engine.errors import UserError

from .job import MANAGER, JobBusy

logger = logging.getLogger(__name__)
PREFIX = "/inplace-lora/v1"


def _error(exc: Exception) -> tuple[int, dict]:
    return (409 if isinstance(exc, JobBusy) else 400), {"error": str(exc)}


def handle_train(body: dict, manager=MANAGER) -> tuple[int, dict]:
    try:
        job = manager.start(body or {})
    except UserError as exc:
        return _error(exc)
    return 200, job.to_dict()


def handle_stop(body: dict | None = None, manager=MANAGER) -> tuple[int, dict]:
    return 200, {"stopping": manager.stop()}


def handle_status(body: dict | None = None, manager=MANAGER) -> tuple[int, dict]:
    return 200, manager.status()


def handle_presets(body: dict | None = None) -> tuple[int, dict]:
    from .presets import load_presets

    return 200, {"presets": load_presets()}


def handle_caption(body: dict) -> tuple[int, dict]:
    from .captioning import caption_folder

    body = body or {}
    try:
        summary = caption_folder(body.get("folder") or body.get("train_data_dir") or "",
                                 body.get("captioner") or "template", mode=body.get("mode") or "skip",
                                 trigger=body.get("trigger") or "", template=body.get("template") or "")
    except UserError as exc:
        return _error(exc)
    return 200, {"summary": summary}


def handle_check(body: dict) -> tuple[int, dict]:
    from .captioning import check_folder

    try:
        return 200, {"report": check_folder(body or {})}
    except UserError as exc:
        return _error(exc)


ROUTES = [("POST", "/train", handle_train), ("POST", "/stop", handle_stop), ("GET", "/status", handle_status),
          ("GET", "/presets", handle_presets), ("POST", "/caption", handle_caption),
          ("POST", "/check", handle_check)]


def _auth_dependencies() -> list:
    """HTTP Basic against --api-auth "user:pass,user2:pass2", as the WebUI's own API checks it."""
    try:
        from modules import shared

        spec = getattr(shared.cmd_opts, "api_auth", None)
    except ImportError:
        spec = None
    if not spec:
        return []
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    users = dict(item.split(":", 1) for item in spec.split(",") if ":" in item)

    def check(credentials=Depends(HTTPBasic())):  # no annotation: this module's annotations are strings
        password = users.get(credentials.username)
        if password is None or not compare_digest(credentials.password, password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return [Depends(check)]


def register(app) -> list[str]:
    """Add the routes to a FastAPI app; returns their paths."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    def endpoint(handler, method: str):
        if method == "GET":
            def get():
                code, payload = handler({})
                return JSONResponse(payload, status_code=code)

            return get

        def post(body: dict = Body(default={})):
            code, payload = handler(body)
            return JSONResponse(payload, status_code=code)

        return post

    dependencies = _auth_dependencies()
    paths = []
    for method, path, handler in ROUTES:
        kwargs = {"dependencies": dependencies} if dependencies else {}
        app.add_api_route(PREFIX + path, endpoint(handler, method), methods=[method], **kwargs)
        paths.append(PREFIX + path)
    return paths
