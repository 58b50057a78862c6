"""``Strict-Transport-Security`` on every response sent over TLS.

Only on ``https`` (RFC 6797 §7.2: a browser ignores it over plain HTTP), and only when
``max_age_s`` is above 0. A header the app set itself is left as it is.
"""

from __future__ import annotations

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send

_NAME = b"strict-transport-security"
_NAME_LENGTH = len(_NAME)


class HSTSMiddleware:
    def __init__(self, app: ASGIApp, max_age_s: int) -> None:
        self.app = app
        self.header = (_NAME, f"max-age={max_age_s}; includeSubDomains".encode())
        self.enabled = max_age_s > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return
        header = self.header

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                for key, _ in headers:
                    # Names of another length cannot match: no lower() for most of them.
                    if len(key) == _NAME_LENGTH and key.lower() == _NAME:
                        break
                else:
                    message["headers"] = [*headers, header]
            await send(message)

        await self.app(scope, receive, send_with_hsts)
