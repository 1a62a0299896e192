"""The SuperLink's public endpoint: Flower's Fleet API only, over TLS.

Flower 1.42's ``flower-superlink`` serves three APIs on its one ``--host``/``--port``
(a FastAPI app under uvicorn, ``flwr.superlink.main.create_app``):

- Fleet (``/v1/fleet/...``, ``flwr.superlink.routers.fleet.router``): what SuperNodes
  call; with ``--enable-supernode-auth`` every call is signed by a registered node key.
- Control (``/v1/control/...``, ``flwr.superlink.routers.control.router``): what ``flwr``
  calls to start, stop and list runs and register nodes. The open-source distribution
  has no authentication for it (``NoOpControlAuthnPlugin``): whoever reaches it can start
  a run, i.e. run an app of their choosing on every SuperNode.
- Runtime / ServerAppIo (``/v1/runtime/...``): what the SuperLink's own SuperExec and
  ServerApp processes call.

The deprecated ``--fleet-api-address`` / ``--control-api-address`` flags no longer bind
anything separately (they only log a warning unless the internal
``FLWR_INTERNAL_GRPC_*`` switches start the legacy gRPC servers), so Flower cannot put
Control on another interface than Fleet. The SuperLink therefore listens on loopback (or
a network only the operator's machines share), and this gateway is what data holders
dial: it terminates TLS with the SuperLink's certificate and forwards a POST to one of the
Fleet routes, by exact path, to the SuperLink; every other request (Control, Runtime,
``/docs``, a path with ``..`` or a query) is answered 403 without reaching it. SuperNode
authentication is unchanged: the signed headers are passed through and checked by the
SuperLink.

    python -m fedlora.deploy gateway --credentials DIR --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DEFAULT_FLEET_PORT = 9092

# The Fleet routes of Flower 1.42 (flwr.superlink.routers.fleet.router; the SuperNode's
# client is flwr.supernode.fleet_http_client.FleetHttpClient). A test compares this set
# with Flower's router, so an upgrade that adds or renames one is noticed.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node",
        "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
        "push-object", "pull-object", "confirm-message-received",
    )
)
# Flower's own largest message (flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH).
MAX_BODY = 2_147_483_647
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
REFUSED = (b"this endpoint serves the SuperLink's Fleet API (SuperNodes) only; "
           b"the Control API (flwr) is reachable from the operator's network only\n")


def is_fleet_request(method: str, path: str, query: bytes = b"") -> bool:
    """Whether a request is one a SuperNode makes: POST to a Fleet route, exactly."""
    return method == "POST" and path in FLEET_ROUTES and not query


class FleetGateway:
    """An ASGI app forwarding Fleet requests to ``upstream`` (``host:port`` of the
    SuperLink); ``ca_cert`` verifies the SuperLink's certificate (``None``: plain HTTP,
    for a SuperLink started with ``--insecure``)."""

    def __init__(self, upstream: str, ca_cert: Path | None, timeout_s: float = 120.0) -> None:
        self.upstream = upstream
        self.base_url = f"{'http' if ca_cert is None else 'https'}://{upstream}"
        self.verify: ssl.SSLContext | bool = False
        if ca_cert is not None:
            self.verify = ssl.create_default_context(cafile=str(ca_cert))
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(base_url=self.base_url, verify=self.verify, timeout=self.timeout)
        return self.client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing of Flower's
            return
        if not is_fleet_request(scope["method"], scope["path"], scope.get("query_string", b"")):
            await _respond(send, 403, REFUSED)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _respond(send, 413, b"request larger than Flower's message limit\n")
                return
            if not message.get("more_body", False):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        try:
            # The path forwarded is the allow-listed constant, never the client's raw path.
            response = await self._client().post(scope["path"], content=bytes(body), headers=headers)
        except httpx.HTTPError as err:
            await _respond(send, 502, f"the gateway cannot reach the SuperLink at {self.upstream}: "
                                      f"{type(err).__name__}\n".encode())
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
               if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"]
        content = response.content  # decoded; content-encoding dropped above to match
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(listen_host: str, listen_port: int, upstream: str, ca_cert: Path | None,
          server_cert: Path | None, server_key: Path | None) -> None:
    """Serve the gateway in the foreground (TLS with the SuperLink's own certificate, so
    SuperNodes verify it with the same ca.crt; plain HTTP when ``server_cert`` is None)."""
    import uvicorn

    uvicorn.run(
        FleetGateway(upstream, ca_cert), host=listen_host, port=listen_port,
        ssl_certfile=None if server_cert is None else str(server_cert),
        ssl_keyfile=None if server_key is None else str(server_key),
        lifespan="on", workers=1, log_level="info", server_header=False,
    )
