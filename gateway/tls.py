"""TLS: the listener's context and its uvicorn wiring, mTLS identity, upstream contexts.

Listener (:func:`server_ssl_context`): TLS 1.2 and 1.3 only, the configured TLS 1.2
suites (Mozilla "intermediate" by default; TLS 1.3 suites are OpenSSL's, all strong), no
compression, no renegotiation, no stateless session tickets, the server's cipher order,
ffdhe2048 for the DHE suites, OpenSSL's default key-exchange groups (X25519, P-256, ...;
``set_ecdh_curve`` would narrow them to one). With ``client_ca`` the client certificate
is verified against it and requested (``optional``) or demanded (``required``).

uvicorn (:func:`uvicorn_options`): uvicorn's ``ssl_*`` options cannot set a minimum
version, so the context is built by ``ssl_context_factory``, which every worker process
calls from its own ``Config.load()``; the factory and the protocol class travel to spawned
workers by pickling, hence module-level names only.

mTLS identity: the listener's protocols (:class:`gateway.listener.ListenerProtocol` with
httptools, :class:`TLSH11Protocol` with h11, as uvicorn would pick) add the ASGI TLS
extension to every request of a TLS connection, computed once per connection::

    scope["extensions"]["tls"] = {
        "server_cert": None,
        "client_cert_chain": ["<PEM of the verified client certificate>"] or [],
        "client_cert_name": "CN=billing-app,O=Example Bank" or None,
        "client_cert_error": None,
        "tls_version": 0x0304,       # 0x0303 for TLS 1.2
        "cipher_suite": 0x1302,      # IANA id of the negotiated suite, None if unknown
    }

``client_cert_name`` is set only for a certificate the handshake verified against
``client_ca`` (so never when ``client_cert`` is ``none``); see :func:`rfc4514_name`.

Upstreams (:func:`upstream_ssl_context`): verification on by default (system CAs, or
``ca_file`` instead), hostname checked, TLS 1.2+, optional client certificate.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.config import ConfigError, TLSSettings, UpstreamSettings, UpstreamTLSSettings

log = logging.getLogger("bastion.tls")

_HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
# The listener's protocol with httptools, TLS or not (it adds the TLS extension itself).
LISTENER_PROTOCOL = "gateway.listener:ListenerProtocol"


class TLSConfigError(ConfigError):
    """A TLS setting cannot be used; ``str(err)`` is one line naming the field."""


# RFC 7919 ffdhe2048, the group Mozilla's guideline names for the DHE suites. Without
# DH parameters OpenSSL (through Python) silently never negotiates a DHE suite.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# OpenSSL's SSL_OP_PRIORITIZE_CHACHA (not exported by Python's ssl): with the server's
# order, still pick ChaCha20 for clients that put it first (no AES hardware).
_OP_PRIORITIZE_CHACHA = 0x00200000

_VERIFY_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def _load_dh_params(ctx: ssl.SSLContext) -> None:
    fd, path = tempfile.mkstemp(prefix="bastion-dh-", suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(FFDHE2048_PEM)
        ctx.load_dh_params(path)
    finally:
        os.unlink(path)


class DirectSSLObject(ssl.SSLObject):
    """``ssl.SSLObject`` whose ``read``, ``write`` and ``pending`` are the C object's own.

    The event loop's TLS protocol (uvloop's and asyncio's) calls them for every record
    in and out; ``ssl.SSLObject``'s are Python functions that only pass the call on, a
    Python frame each, three or four per request. Same results, same exceptions; the
    one difference, ``read`` needs its size (both loops always pass it). Everything else
    is ``ssl.SSLObject``'s.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:  # type: ignore[override]
        self: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = self._sslobj  # type: ignore[attr-defined]
        # Instance attributes come before the class's methods.
        self.read = inner.read  # type: ignore[method-assign]
        self.write = inner.write  # type: ignore[method-assign]
        self.pending = inner.pending  # type: ignore[method-assign]
        return self


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context, or :class:`TLSConfigError` naming the unusable setting."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_NO_TICKET
        | _OP_PRIORITIZE_CHACHA
    )
    try:
        ctx.set_ciphers(tls.ciphers)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"server.tls.ciphers: no usable cipher in {tls.ciphers!r}") from exc
    _load_dh_params(ctx)
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"server.tls: cannot load certfile {tls.certfile} with keyfile {tls.keyfile} ({exc})"
        ) from exc
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"server.tls.client_ca: cannot load {tls.client_ca} ({exc})"
            ) from exc
    ctx.verify_mode = _VERIFY_MODES[tls.client_cert]
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# --- uvicorn ---------------------------------------------------------------------------


def _uvicorn_ssl_context(
    tls: TLSSettings, _config: object, _default: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    return server_ssl_context(tls)


def uvicorn_options(tls: TLSSettings, http: str = "auto") -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that serve with our context.

    ``http`` is the protocol uvicorn would otherwise use (``httptools``, ``h11`` or
    ``auto``); the returned one is its subclass that adds the ASGI TLS extension. The
    context is built once here, so a bad setting fails before any worker starts.
    """
    server_ssl_context(tls)
    use_httptools = http == "httptools" or (http == "auto" and _HAS_HTTPTOOLS)
    options: dict[str, Any] = {
        "ssl_context_factory": functools.partial(_uvicorn_ssl_context, tls),
        "http": LISTENER_PROTOCOL if use_httptools else f"{__name__}:TLSH11Protocol",
    }
    if tls.hsts_max_age_s > 0:
        # HSTS on every answer of a TLS listener, uvicorn's own (400, 500) included: one of
        # uvicorn's default headers costs nothing per request, where a middleware wrapping
        # `send` cost about 2 % of the gateway's CPU. Plain HTTP never gets it (RFC 6797
        # §7.2: a browser ignores it there).
        options["headers"] = [("strict-transport-security", hsts_value(tls.hsts_max_age_s))]
    return options


def hsts_value(max_age_s: int) -> str:
    return f"max-age={max_age_s}; includeSubDomains"


# --- mTLS identity ---------------------------------------------------------------------

# OpenSSL long names (what ``getpeercert()`` gives) to the attribute types that
# ``cryptography``'s ``Name.rfc4514_string()`` writes: its nine short names, else the OID.
_RFC4514_TYPES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "serialNumber": "2.5.4.5",
    "surname": "2.5.4.4",
    "givenName": "2.5.4.42",
    "title": "2.5.4.12",
    "initials": "2.5.4.43",
    "generationQualifier": "2.5.4.44",
    "dnQualifier": "2.5.4.46",
    "pseudonym": "2.5.4.65",
    "businessCategory": "2.5.4.15",
    "postalAddress": "2.5.4.16",
    "postalCode": "2.5.4.17",
    "organizationIdentifier": "2.5.4.97",
    "emailAddress": "1.2.840.113549.1.9.1",
    "unstructuredName": "1.2.840.113549.1.9.2",
    "jurisdictionLocalityName": "1.3.6.1.4.1.311.60.2.1.1",
    "jurisdictionStateOrProvinceName": "1.3.6.1.4.1.311.60.2.1.2",
    "jurisdictionCountryName": "1.3.6.1.4.1.311.60.2.1.3",
}


def _escape_rfc4514(value: str) -> str:
    if not value:
        return ""
    for char in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(char, "\\" + char)
    value = value.replace("\0", "\\00")
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


_Subject = Iterable[Iterable[tuple[str, str]]]


def rfc4514_name(subject: _Subject) -> str:
    """A subject as ``getpeercert()["subject"]`` gives it, as an RFC 4514 string.

    Same text as ``cryptography``'s ``x509.Name.rfc4514_string()``: the RDNs in reverse
    certificate order (most specific first, ``CN=billing-app,O=Example Bank,C=US``),
    ``+`` between the attributes of a multi-valued RDN, short names CN L ST O OU C STREET
    DC UID and dotted OIDs for other types, RFC 4514 escaping of the values.
    """
    rdns = [
        "+".join(
            f"{_RFC4514_TYPES.get(kind, kind)}={_escape_rfc4514(value)}" for kind, value in rdn
        )
        for rdn in subject
    ]
    return ",".join(reversed(rdns))


_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_CIPHER_IDS: dict[str, int] = {}


def _cipher_suite_id(name: str, ctx: ssl.SSLContext) -> int | None:
    if name not in _CIPHER_IDS:
        for cipher in ctx.get_ciphers():
            _CIPHER_IDS[cipher["name"]] = cipher["id"] & 0xFFFF
    return _CIPHER_IDS.get(name)


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension for one established connection (see the module docstring)."""
    peer = ssl_object.getpeercert()
    subject = cast("_Subject | None", peer.get("subject") if peer else None)
    name = rfc4514_name(subject) if subject else None
    chain: list[str] = []
    if name is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            chain.append(ssl.DER_cert_to_PEM_cert(der))
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(version) if version else None,
        "cipher_suite": _cipher_suite_id(cipher[0], ssl_object.context) if cipher else None,
    }


def connection_tls(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        return tls_extension(ssl_object)
    except (ValueError, ssl.SSLError):  # connection already gone
        return None


class _WithTLSExtension:
    """Sets ``scope["extensions"]["tls"]`` before calling the app (the h11 protocol)."""

    __slots__ = ("app", "tls")

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions") or {}
        extensions["tls"] = self.tls
        scope["extensions"] = extensions
        await self.app(scope, receive, send)


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class TLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the ASGI TLS extension."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = connection_tls(transport)
        if tls is not None:
            self.app = _WithTLSExtension(self.app, tls)


# --- upstreams -------------------------------------------------------------------------


def upstream_ssl_context(tls: UpstreamTLSSettings, upstream: str = "") -> ssl.SSLContext:
    """The context aiohttp uses towards one ``https://`` upstream.

    Verifying (``ca_file`` replaces the system CAs) with hostname checks, TLS 1.2+, and
    the client certificate when configured. ``verify: false`` gives a context that checks
    nothing, and says so in a warning when it is built (once per upstream and process).
    """
    where = f"upstreams.{upstream}.tls" if upstream else "upstreams.tls"
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file if tls.verify else None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{where}.ca_file: cannot load {tls.ca_file} ({exc})") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "TLS verification is off towards upstream %s: its certificate is not checked",
            upstream or "(unnamed)",
        )
    if tls.client_certfile is not None:
        try:
            ctx.load_cert_chain(tls.client_certfile, tls.client_keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"{where}: cannot load client_certfile {tls.client_certfile} ({exc})"
            ) from exc
    return ctx


def upstream_ssl_contexts(upstreams: Sequence[UpstreamSettings]) -> dict[str, ssl.SSLContext]:
    """``base_url`` -> context for every ``https://`` upstream (for the transport).

    Upstreams at the same URL share one context, so they must agree on ``tls``.
    """
    contexts: dict[str, ssl.SSLContext] = {}
    first: dict[str, UpstreamSettings] = {}
    for upstream in upstreams:
        url = upstream.base_url
        if not url.startswith("https://"):
            continue
        if url in first:
            if first[url].tls != upstream.tls:
                raise TLSConfigError(
                    f"upstreams.{upstream.name}.tls: differs from upstream "
                    f"{first[url].name} at the same URL {url}"
                )
            continue
        first[url] = upstream
        contexts[url] = upstream_ssl_context(upstream.tls, upstream.name)
    return contexts
