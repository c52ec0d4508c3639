"""The "app backend" of a Nexus deployment, as the JavaScript integration tests run it.

A real FastAPI application doing what an application's own backend does around Nexus for
private conversations:

- mints socket tokens, `{"sub": user_id, "exp": now + 24 h}` signed HS256 with JWT_SECRET,
  optionally with a `"chats"` claim listing the user's conversations (the `token` join policy);
- mints join tokens `{"sub", "chat", "exp"}` for one conversation, to members only;
- keeps the membership table (conversation -> set of users);
- answers Nexus's join proxy (`POST /nexus/authorize`, the `proxy` join policy): 401 unless the
  bearer is PROXY_SECRET, 200 for a member, 403 otherwise;
- calls the Nexus server API with NEXUS_API_KEY, with nothing but the standard library's urllib:
  post a system message, remove a member (drop it from the table, then DELETE it on Nexus), kick
  a user (POST disconnect), answering `{"nexus_status": <status>, "nexus_body": <body>}`.

Test-only routes under `/test/` let a test read how many times Nexus asked about each
(user, conversation), switch the join proxy's behaviour (normal, slow: answers after longer
than Nexus's timeout, error: 500) and point the backend at a Nexus started after it.

Configuration (environment): JWT_SECRET and PROXY_SECRET (required), NEXUS_URL (e.g.
`http://127.0.0.1:4000`; may be set later with `PUT /test/config`), NEXUS_API_KEY.
Run it with `python -m uvicorn app:app --port 8000` from this directory, or with `serve.py`,
which binds a free port itself and prints it (what the tests use).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from typing import Any

import jwt
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

SOCKET_TOKEN_TTL_S = 24 * 3600
JOIN_TOKEN_TTL_S = 5 * 60
# How long one call to the Nexus server API may take before the route answers 502.
NEXUS_CALL_TIMEOUT_S = 5.0
# The proxy's "slow" mode answers after this long unless told otherwise: well past the
# 300 ms the tests give Nexus (NEXUS_JOIN_PROXY_TIMEOUT), and past its 2 s default too.
DEFAULT_SLOW_MS = 3_000
PROXY_MODES = ("normal", "slow", "error")


def _required_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"tests/backend: {name} is required")
    return value


JWT_SECRET = _required_env("JWT_SECRET")
PROXY_SECRET = _required_env("PROXY_SECRET")


class State:
    """Everything the backend holds; one lock, as sync routes run on a thread pool."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.members: dict[str, set[str]] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.refused_bearer = 0
        self.mode = "normal"
        self.delay_ms = 0
        self.slow_ms = DEFAULT_SLOW_MS
        self.nexus_url = os.environ.get("NEXUS_URL", "").rstrip("/")
        self.nexus_api_key = os.environ.get("NEXUS_API_KEY", "")

    def is_member(self, conversation: str, user: str) -> bool:
        with self.lock:
            return user in self.members.get(conversation, ())


state = State()
app = FastAPI(title="Nexus test app backend", docs_url=None, redoc_url=None, openapi_url=None)


def canonical_uuid(value: Any, what: str) -> str:
    """`value` as a lowercase hyphenated UUID string, or 400."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise HTTPException(400, f"{what} is not a UUID: {value!r}") from None


def mint(claims: dict[str, Any], ttl_s: int) -> str:
    return jwt.encode({**claims, "exp": int(time.time()) + ttl_s}, JWT_SECRET, algorithm="HS256")


@app.get("/healthz")
def healthz() -> Response:
    return Response("ok", media_type="text/plain")


# ---------------------------------------------------------------------------------------------
# Tokens


@app.post("/users/{user_id}/socket-token")
def socket_token(user_id: str, chats: bool = False) -> dict[str, Any]:
    """A 24 h socket token; `?chats=true` adds the user's conversations as the "chats" claim."""
    user = canonical_uuid(user_id, "user_id")
    claims: dict[str, Any] = {"sub": user}
    if chats:
        with state.lock:
            claims["chats"] = sorted(c for c, users in state.members.items() if user in users)
    return {"token": mint(claims, SOCKET_TOKEN_TTL_S), "claims": claims}


@app.post("/users/{user_id}/join-token/{conversation_id}")
def join_token(user_id: str, conversation_id: str) -> dict[str, Any]:
    """A short-lived token to join one conversation, for its members only (else 403)."""
    user = canonical_uuid(user_id, "user_id")
    conversation = canonical_uuid(conversation_id, "conversation_id")
    if not state.is_member(conversation, user):
        raise HTTPException(403, "not a member")
    return {"token": mint({"sub": user, "chat": conversation}, JOIN_TOKEN_TTL_S)}


# ---------------------------------------------------------------------------------------------
# Membership


@app.put("/conversations/{conversation_id}/members/{user_id}", status_code=204)
def add_member(conversation_id: str, user_id: str) -> Response:
    conversation = canonical_uuid(conversation_id, "conversation_id")
    user = canonical_uuid(user_id, "user_id")
    with state.lock:
        state.members.setdefault(conversation, set()).add(user)
    return Response(status_code=204)


@app.get("/conversations/{conversation_id}/members")
def list_members(conversation_id: str) -> dict[str, Any]:
    conversation = canonical_uuid(conversation_id, "conversation_id")
    with state.lock:
        return {"members": sorted(state.members.get(conversation, ()))}


@app.delete("/conversations/{conversation_id}/members/{user_id}")
def remove_member(conversation_id: str, user_id: str, notify: bool = True) -> dict[str, Any]:
    """Drops the user from the table, then (unless `?notify=false`) removes it on Nexus."""
    conversation = canonical_uuid(conversation_id, "conversation_id")
    user = canonical_uuid(user_id, "user_id")
    with state.lock:
        was_member = user in state.members.get(conversation, ())
        state.members.get(conversation, set()).discard(user)
    reply: dict[str, Any] = {"was_member": was_member}
    if notify:
        reply.update(call_nexus("DELETE", f"/api/conversations/{conversation}/members/{user}"))
    return reply


# ---------------------------------------------------------------------------------------------
# Nexus's join proxy


@app.post("/nexus/authorize")
async def authorize(request: Request) -> Response:
    """Nexus asks whether a user may join a conversation: 200 yes, 403 no, 401 not Nexus."""
    if request.headers.get("authorization") != f"Bearer {PROXY_SECRET}":
        with state.lock:
            state.refused_bearer += 1
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    try:
        body = json.loads(await request.body())
        user = str(uuid.UUID(body["user_id"]))
        conversation = str(uuid.UUID(body["conversation_id"]))
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "bad request"}, status_code=400)
    with state.lock:
        state.calls[(user, conversation)] += 1
        mode, delay_ms, slow_ms = state.mode, state.delay_ms, state.slow_ms
    if mode == "error":
        return JSONResponse({"error": "backend failure (test mode)"}, status_code=500)
    wait_ms = slow_ms if mode == "slow" else delay_ms
    if wait_ms:
        await asyncio.sleep(wait_ms / 1000)
    if state.is_member(conversation, user):
        return JSONResponse({"allow": True}, status_code=200)
    return JSONResponse({"allow": False}, status_code=403)


# ---------------------------------------------------------------------------------------------
# The Nexus server API


def call_nexus(method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One server API call; `{"nexus_status", "nexus_body"}` whatever Nexus answered, else 502."""
    with state.lock:
        base, key = state.nexus_url, state.nexus_api_key
    if not base:
        raise HTTPException(503, "NEXUS_URL is not set")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=NEXUS_CALL_TIMEOUT_S) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        raise HTTPException(502, f"Nexus unreachable: {err}") from None
    text = raw.decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return {"nexus_status": status, "nexus_body": parsed}


@app.post("/conversations/{conversation_id}/messages")
async def system_message(conversation_id: str, request: Request) -> dict[str, Any]:
    """Posts `{"sender_id", "body"}` (passed through as given) to the conversation on Nexus."""
    conversation = canonical_uuid(conversation_id, "conversation_id")
    try:
        payload = json.loads(await request.body())
    except ValueError:
        raise HTTPException(400, "body must be JSON") from None
    return await asyncio.to_thread(call_nexus, "POST", f"/api/conversations/{conversation}/messages", payload)


@app.post("/users/{user_id}/kick")
def kick(user_id: str) -> dict[str, Any]:
    """Closes every socket of the user on Nexus (POST disconnect)."""
    user = canonical_uuid(user_id, "user_id")
    return call_nexus("POST", f"/api/users/{user}/disconnect")


# ---------------------------------------------------------------------------------------------
# Test-only controls


@app.get("/test/calls")
def calls(user_id: str | None = None, conversation_id: str | None = None) -> dict[str, Any]:
    """Join proxy calls: for one pair `{"count"}`, else every pair and the total."""
    with state.lock:
        if user_id is not None or conversation_id is not None:
            pair = (canonical_uuid(user_id, "user_id"), canonical_uuid(conversation_id, "conversation_id"))
            return {"count": state.calls[pair]}
        return {
            "total": sum(state.calls.values()),
            "refused_bearer": state.refused_bearer,
            "pairs": [{"user_id": u, "conversation_id": c, "count": n} for (u, c), n in state.calls.items()],
        }


@app.get("/test/proxy")
def get_proxy_mode() -> dict[str, Any]:
    with state.lock:
        return {"mode": state.mode, "delay_ms": state.delay_ms, "slow_ms": state.slow_ms}


@app.put("/test/proxy")
async def set_proxy_mode(request: Request) -> dict[str, Any]:
    """`{"mode": "normal"|"slow"|"error", "delay_ms"?: n (normal mode), "slow_ms"?: n}`."""
    try:
        body = json.loads(await request.body())
        mode = body.get("mode", "normal")
        delay_ms = int(body.get("delay_ms", 0))
        slow_ms = int(body.get("slow_ms", DEFAULT_SLOW_MS))
    except (ValueError, AttributeError, TypeError):
        raise HTTPException(400, "expected {mode, delay_ms?, slow_ms?}") from None
    if mode not in PROXY_MODES or delay_ms < 0 or slow_ms < 0:
        raise HTTPException(400, f"mode is one of {PROXY_MODES}; delays are >= 0")
    with state.lock:
        state.mode, state.delay_ms, state.slow_ms = mode, delay_ms, slow_ms
    return get_proxy_mode()


@app.put("/test/config")
async def set_config(request: Request) -> dict[str, Any]:
    """`{"nexus_url"?, "nexus_api_key"?}`: the Nexus to call (started after the backend)."""
    try:
        body = json.loads(await request.body())
        with state.lock:
            if "nexus_url" in body:
                state.nexus_url = str(body["nexus_url"]).rstrip("/")
            if "nexus_api_key" in body:
                state.nexus_api_key = str(body["nexus_api_key"])
            return {"nexus_url": state.nexus_url}
    except (ValueError, AttributeError, TypeError):
        raise HTTPException(400, "expected {nexus_url?, nexus_api_key?}") from None
