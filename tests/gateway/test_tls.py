"""TLS on the listener, mutual TLS, HSTS and TLS towards upstreams (gateway/tls.py).

Certificates come from ``trustme``. Listener tests run uvicorn in a thread with exactly
the options ``bastion serve`` uses (``gateway.tls.uvicorn_options``) in front of a tiny
ASGI app that echoes ``scope["extensions"]["tls"]``; the gateway tests run a real
``bastion serve`` process (one with ``workers: 2``) in front of an ``https`` fixture upstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import http.client
import json
import logging
import os
import pickle
import socket
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import uvicorn
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.upstream_transports import AiohttpTransport
from gateway.asgi import Receive, Scope, Send
from gateway.config import TLSSettings, UpstreamSettings, UpstreamTLSSettings
from gateway.tls import (
    DirectSSLObject,
    TLSConfigError,
    rfc4514_name,
    server_ssl_context,
    upstream_ssl_context,
    upstream_ssl_contexts,
    uvicorn_options,
)
from tests.gateway.test_access import signing_key_beside
from tests.support import ManagedProcess, bastion_command, chat_body, free_port, wait_until
from tests.upstream_server import expected_text, make_app

RSA = trustme.KeyType.RSA
CLIENT_SUBJECT = "CN=billing-app,OU=payments,O=Example Bank"


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    """Signed the listener's certificates."""
    other_ca: Path
    """Signed nothing the servers trust."""
    server_cert: Path
    server_key: Path
    expired_cert: Path
    expired_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate with the same subject, from another CA."""
    stranger_key: Path


def _write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = trustme.CA(key_type=RSA), trustme.CA(), trustme.CA()
    for authority, name in ((ca, "ca"), (other_ca, "other-ca"), (client_ca, "client-ca")):
        authority.cert_pem.write_to_path(str(directory / f"{name}.pem"))
    # An RSA server key, so that the RSA-only suites a weak client asks for are possible
    # key exchanges and only the configured cipher list can refuse them.
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=RSA)
    past = datetime.datetime(2020, 1, 1)
    expired = ca.issue_cert(
        "localhost", "127.0.0.1", not_before=past, not_after=past + datetime.timedelta(days=30)
    )
    client, stranger = (
        authority.issue_cert(
            common_name="billing-app",
            organization_name="Example Bank",
            organization_unit_name="payments",
        )
        for authority in (client_ca, other_ca)
    )
    server_cert, server_key = _write_leaf(server, directory, "server")
    expired_cert, expired_key = _write_leaf(expired, directory, "expired")
    client_cert, client_key = _write_leaf(client, directory, "client")
    stranger_cert, stranger_key = _write_leaf(stranger, directory, "stranger")
    return PKI(
        directory,
        directory / "ca.pem",
        directory / "other-ca.pem",
        server_cert,
        server_key,
        expired_cert,
        expired_key,
        directory / "client-ca.pem",
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
    )


def tls_settings(pki: PKI, **changes: Any) -> TLSSettings:
    fields: dict[str, Any] = {"certfile": pki.server_cert, "keyfile": pki.server_key}
    return TLSSettings(**{**fields, **changes})


# --- a uvicorn server in a thread ------------------------------------------------------


async def echo_tls(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with its scheme and ``scope["extensions"]["tls"]``."""
    if scope["type"] != "http":
        return
    body = json.dumps(
        {"scheme": scope["scheme"], "tls": (scope.get("extensions") or {}).get("tls")}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(
    app: Any,
    tls: TLSSettings | None,
    http: str = "httptools",
    context: ssl.SSLContext | None = None,
) -> Iterator[int]:
    """Run ``app`` on a free loopback port with the listener options of ``bastion serve``.

    ``context`` replaces the listener's context (for control experiments).
    """
    port = free_port()
    options: dict[str, Any] = {"http": http}
    if tls is not None:
        options.update(uvicorn_options(tls, http))
    if context is not None:
        options["ssl_context_factory"] = lambda _config, _default: context
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 10, what="uvicorn start")
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tls_server(pki: PKI) -> Iterator[int]:
    """The default listener: the Mozilla intermediate configuration, no client certs."""
    with serving(echo_tls, tls_settings(pki)) as port:
        yield port


# --- clients -------------------------------------------------------------------------------


def client_context(
    cafile: Path | None,
    *,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    cert: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS < 1.2 on the client at the default security level.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and TLSv1_1
            ctx.minimum_version = version
            ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/") -> http.client.HTTPResponse:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def echo(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        data: dict[str, Any] = json.loads(response.read())
        return data
    finally:
        conn.close()


REFUSED = (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)


def refused(port: int, ctx: ssl.SSLContext) -> BaseException:
    """The exception a client gets: in the handshake, or (TLS 1.3 mTLS) on the first read."""
    with pytest.raises(REFUSED) as info:
        echo(port, ctx)
    return info.value


# --- the listener --------------------------------------------------------------------------


def test_handshake_succeeds_with_the_right_ca(pki: PKI, tls_server: int) -> None:
    data = echo(tls_server, client_context(pki.ca))
    assert data["scheme"] == "https"
    tls = data["tls"]
    assert tls["tls_version"] == 0x0304
    assert tls["client_cert_name"] is None
    assert tls["client_cert_chain"] == []
    assert tls["cipher_suite"] in (0x1301, 0x1302, 0x1303)


def test_client_with_the_wrong_ca_refuses_the_server(pki: PKI, tls_server: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        echo(tls_server, client_context(pki.other_ca))


def test_expired_server_certificate_is_refused(pki: PKI) -> None:
    tls = tls_settings(pki, certfile=pki.expired_cert, keyfile=pki.expired_key)
    with serving(echo_tls, tls) as port, pytest.raises(ssl.SSLCertVerificationError) as info:
        echo(port, client_context(pki.ca))
    assert "expired" in str(info.value)


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=lambda v: v.name
)
def test_tls_below_1_2_is_refused(pki: PKI, tls_server: int, version: ssl.TLSVersion) -> None:
    ctx = client_context(None, version=version)
    assert isinstance(refused(tls_server, ctx), ssl.SSLError)
    # Control: the same client gets through to a server that still allows that version.
    legacy = server_ssl_context(tls_settings(pki, ciphers="DEFAULT:@SECLEVEL=0"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.minimum_version = version
    with serving(echo_tls, None, "gateway.listener:ListenerProtocol", legacy) as port:
        assert (
            echo(port, ctx)["tls"]["tls_version"]
            == {"TLSv1": 0x0301, "TLSv1_1": 0x0302}[version.name]
        )


@pytest.mark.parametrize(
    ("version", "code"),
    [(ssl.TLSVersion.TLSv1_2, 0x0303), (ssl.TLSVersion.TLSv1_3, 0x0304)],
    ids=["TLSv1.2", "TLSv1.3"],
)
def test_tls_1_2_and_1_3_clients_succeed(
    pki: PKI, tls_server: int, version: ssl.TLSVersion, code: int
) -> None:
    tls = echo(tls_server, client_context(pki.ca, version=version))["tls"]
    assert tls["tls_version"] == code


MOZILLA_SUITE_IDS = {0xC02F, 0xC030, 0xCCA8, 0x009E, 0x009F, 0xCCAA, 0xC02B, 0xC02C, 0xCCA9}


@pytest.mark.parametrize(
    "cipher",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305", "DHE-RSA-AES256-GCM-SHA384"],
)
def test_tls_1_2_intermediate_suites_are_served(pki: PKI, tls_server: int, cipher: str) -> None:
    ctx = client_context(pki.ca, version=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
    tls = echo(tls_server, ctx)["tls"]
    assert tls["cipher_suite"] in MOZILLA_SUITE_IDS


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-SHA",  # RSA key exchange, CBC: no forward secrecy
        "AES256-GCM-SHA384",  # RSA key exchange
        "ECDHE-RSA-AES128-SHA",  # forward secret but CBC with SHA-1
        "DES-CBC3-SHA",  # 3DES (Sweet32)
        "ECDHE-RSA-DES-CBC3-SHA",
    ],
)
def test_weak_cipher_only_client_is_refused(pki: PKI, tls_server: int, cipher: str) -> None:
    try:
        ctx = client_context(
            pki.ca, version=ssl.TLSVersion.TLSv1_2, ciphers=f"{cipher}:@SECLEVEL=0"
        )
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL cannot offer {cipher} at all")
    # The server's alert may not get out before asyncio closes the socket: the client
    # sees a handshake failure alert or an EOF, always in the handshake.
    assert isinstance(refused(tls_server, ctx), ssl.SSLError)
    # Control: the same client gets through to a server configured with that cipher.
    permissive = tls_settings(pki, ciphers=f"{cipher}:@SECLEVEL=0")
    with serving(echo_tls, permissive) as port:
        assert echo(port, ctx)["tls"]["tls_version"] == 0x0303


def test_tls_1_2_only_offers_forward_secret_aead_suites(pki: PKI) -> None:
    ctx = server_ssl_context(tls_settings(pki))
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["aead"], cipher
        assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.verify_mode == ssl.CERT_NONE


def _pump(source: ssl.MemoryBIO, sink: ssl.MemoryBIO) -> None:
    data = source.read()
    if data:
        sink.write(data)


def test_the_listener_s_tls_objects_call_the_c_object_directly(pki: PKI) -> None:
    """What the event loop's TLS protocol calls per record is the C object's own method,
    and a whole exchange over memory BIOs behaves as ``ssl.SSLObject``'s does."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ssl_context(tls_settings(pki)).wrap_bio(server_in, server_out, True)
    assert isinstance(server, DirectSSLObject) and isinstance(server, ssl.SSLObject)
    for name in ("read", "write", "pending"):
        assert type(getattr(server, name)).__name__ == "builtin_function_or_method", name
    client = client_context(pki.ca).wrap_bio(client_in, client_out, server_hostname="localhost")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(client_out, server_in)
        _pump(server_out, client_in)
    assert server.version() == client.version() == "TLSv1.3"
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)  # nothing has come: the same exception as ssl.SSLObject's
    client.write(b"POST / HTTP/1.1\r\n\r\n")
    _pump(client_out, server_in)
    buffer = bytearray(64)
    assert server.read(6, buffer) == 6 and buffer[:6] == b"POST /"
    assert server.pending() > 0
    assert server.read(262144) == b" HTTP/1.1\r\n\r\n"
    assert server.pending() == 0
    assert server.write(b"HTTP/1.1 200 OK\r\n\r\n") == 19
    _pump(server_out, client_in)
    assert client.read(1024) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_unusable_settings_are_one_line_errors(pki: PKI) -> None:
    with pytest.raises(TLSConfigError, match=r"server\.tls\.ciphers"):
        server_ssl_context(tls_settings(pki, ciphers="NOT-A-CIPHER"))
    with pytest.raises(TLSConfigError, match=r"server\.tls: cannot load certfile"):
        server_ssl_context(tls_settings(pki, keyfile=pki.client_key))


def test_uvicorn_options_survive_pickling_for_worker_processes(pki: PKI) -> None:
    options = uvicorn_options(tls_settings(pki), "httptools")
    factory = pickle.loads(pickle.dumps(options["ssl_context_factory"]))
    ctx = factory(None, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert options["http"] == "gateway.listener:ListenerProtocol"
    assert uvicorn_options(tls_settings(pki), "h11")["http"] == "gateway.tls:TLSH11Protocol"


# --- mutual TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["httptools", "h11"])
def mtls_server(request: pytest.FixtureRequest, pki: PKI) -> Iterator[int]:
    tls = tls_settings(pki, client_ca=pki.client_ca, client_cert="required")
    with serving(echo_tls, tls, http=request.param) as port:
        yield port


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name
)
def test_mtls_required_refuses_a_client_without_certificate(
    pki: PKI, mtls_server: int, version: ssl.TLSVersion
) -> None:
    refused(mtls_server, client_context(pki.ca, version=version))


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name
)
def test_mtls_required_refuses_a_certificate_from_another_ca(
    pki: PKI, mtls_server: int, version: ssl.TLSVersion
) -> None:
    cert = (pki.stranger_cert, pki.stranger_key)
    refused(mtls_server, client_context(pki.ca, version=version, cert=cert))


def test_mtls_good_certificate_reaches_the_app_with_its_subject(pki: PKI, mtls_server: int) -> None:
    ctx = client_context(pki.ca, cert=(pki.client_cert, pki.client_key))
    tls = echo(mtls_server, ctx)["tls"]
    subject = x509.load_pem_x509_certificate(pki.client_cert.read_bytes()).subject
    assert tls["client_cert_name"] == CLIENT_SUBJECT == subject.rfc4514_string()
    [pem] = tls["client_cert_chain"]
    assert x509.load_pem_x509_certificate(pem.encode()).subject == subject


def test_mtls_extension_on_every_request_of_a_connection(pki: PKI, mtls_server: int) -> None:
    ctx = client_context(pki.ca, cert=(pki.client_cert, pki.client_key))
    conn = http.client.HTTPSConnection("127.0.0.1", mtls_server, context=ctx, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/")
            data = json.loads(conn.getresponse().read())
            assert data["tls"]["client_cert_name"] == CLIENT_SUBJECT
    finally:
        conn.close()


def test_mtls_optional_accepts_both_and_names_only_the_certified(pki: PKI) -> None:
    tls = tls_settings(pki, client_ca=pki.client_ca, client_cert="optional")
    with serving(echo_tls, tls) as port:
        assert echo(port, client_context(pki.ca))["tls"]["client_cert_name"] is None
        ctx = client_context(pki.ca, cert=(pki.client_cert, pki.client_key))
        assert echo(port, ctx)["tls"]["client_cert_name"] == CLIENT_SUBJECT
        stranger = client_context(pki.ca, cert=(pki.stranger_cert, pki.stranger_key))
        refused(port, stranger)


def _self_signed(path: Path, name: x509.Name) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    "attributes",
    [
        [[(NameOID.COUNTRY_NAME, "US")], [(NameOID.ORGANIZATION_NAME, "Example Bank")]],
        [
            [(NameOID.DOMAIN_COMPONENT, "com")],
            [(NameOID.DOMAIN_COMPONENT, "example")],
            [(NameOID.STATE_OR_PROVINCE_NAME, "New York")],
            [(NameOID.LOCALITY_NAME, "New York")],
            [(NameOID.STREET_ADDRESS, "1 Wall St")],
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Risk, Models+Data")],
            [(NameOID.USER_ID, "u123")],
            [(NameOID.EMAIL_ADDRESS, "ops@example.com")],
            [(NameOID.SERIAL_NUMBER, "42")],
            [(NameOID.COMMON_NAME, '#x "quoted" <a>; back\\slash ')],
        ],
        [
            [(NameOID.ORGANIZATION_NAME, " leading space")],
            [(NameOID.COMMON_NAME, "svc"), (NameOID.USER_ID, "multi")],
            [(NameOID.GIVEN_NAME, "Ada"), (NameOID.SURNAME, "Lovelace")],
            [(NameOID.ORGANIZATION_IDENTIFIER, "LEI-123")],
            [(NameOID.JURISDICTION_COUNTRY_NAME, "DE")],
            [(NameOID.BUSINESS_CATEGORY, "Private Organization")],
            [(NameOID.POSTAL_CODE, "10005")],
            [(NameOID.TITLE, "Dr")],
            [(NameOID.PSEUDONYM, "p")],
        ],
    ],
)
def test_rfc4514_name_matches_cryptography(
    tmp_path: Path, attributes: list[list[tuple[x509.ObjectIdentifier, str]]]
) -> None:
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in rdn])
            for rdn in attributes
        ]
    )
    path = tmp_path / "cert.pem"
    _self_signed(path, name)
    # What getpeercert() returns for this certificate.
    decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    reparsed = x509.load_pem_x509_certificate(path.read_bytes()).subject
    assert rfc4514_name(decoded["subject"]) == reparsed.rfc4514_string()


# --- HSTS ----------------------------------------------------------------------------------


def test_hsts_on_https_responses_only(pki: PKI) -> None:
    with serving(echo_tls, tls_settings(pki)) as port:
        response = https_get(port, client_context(pki.ca))
        assert (
            response.getheader("strict-transport-security") == "max-age=31536000; includeSubDomains"
        )
        # uvicorn's own answers carry it too: a malformed request gets a 400 with HSTS.
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_context(pki.ca).wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n")
            answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400")
        assert b"strict-transport-security: max-age=31536000; includeSubDomains\r\n" in answer
    with serving(echo_tls, None) as port:
        plain = httpx.get(f"http://127.0.0.1:{port}/")
        assert plain.status_code == 200
        assert "strict-transport-security" not in plain.headers


def test_hsts_max_age(pki: PKI) -> None:
    with serving(echo_tls, tls_settings(pki, hsts_max_age_s=60)) as port:
        hsts = https_get(port, client_context(pki.ca)).getheader("strict-transport-security")
        assert hsts == "max-age=60; includeSubDomains"
    with serving(echo_tls, tls_settings(pki, hsts_max_age_s=0)) as port:
        assert (
            https_get(port, client_context(pki.ca)).getheader("strict-transport-security") is None
        )


# --- TLS towards upstreams -----------------------------------------------------------------


def test_upstream_context_verifies_by_default(pki: PKI) -> None:
    ctx = upstream_ssl_context(UpstreamTLSSettings(ca_file=pki.ca))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    system = upstream_ssl_context(UpstreamTLSSettings())
    assert system.verify_mode == ssl.CERT_REQUIRED
    assert system.cert_store_stats()["x509_ca"] != ctx.cert_store_stats()["x509_ca"]


def test_upstream_context_without_verification_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="bastion.tls"):
        ctx = upstream_ssl_context(UpstreamTLSSettings(verify=False), "lab")
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname
    assert "verification is off towards upstream lab" in caplog.text


def test_transport_picks_the_context_of_the_upstream_base_url() -> None:
    a, b = ssl.create_default_context(), ssl.create_default_context()
    transport = AiohttpTransport(
        1, 1, upstream_ssl={"https://h:1": a, "https://h:1/v2": b, "https://g:1/x": b}
    )
    assert transport._ssl_for("https://h:1/v1/chat/completions") is a
    assert transport._ssl_for("https://h:1/v2/chat/completions") is b
    assert transport._ssl_for("https://g:1/x/health") is b
    assert transport._ssl_for("https://g:1/xy/health") is True
    assert transport._ssl_for("https://other:1/v1/models") is True


class TLSUpstream:
    """tests/upstream_server.py's app served over TLS from a thread."""

    def __init__(self, name: str, models: list[str], ssl_context: ssl.SSLContext) -> None:
        self.name = name
        self.models = models
        self.port = free_port()
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def __enter__(self) -> TLSUpstream:
        self._thread.start()

        async def start() -> None:
            self._runner = web.AppRunner(make_app(self.name, self.models), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl)
            await site.start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def upstream_server_context(pki: PKI, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TLSGateway:
    """``bastion serve`` from a YAML, over https when ``server.tls`` is set."""

    def __init__(self, work_dir: Path, config: dict[str, Any], ca: Path) -> None:
        self.port = free_port()
        self.work_dir = work_dir
        self.ca = ca
        key = work_dir / "master.key"
        if not key.exists():
            key.write_text(base64.b64encode(os.urandom(32)).decode())
        base: dict[str, Any] = {
            "dev": True,
            "master_key_file": str(key),
            "database_url": f"sqlite:///{work_dir}/bastion-{self.port}.db",
            "auth": {"enabled": False},
            "rate_limits": {"enabled": False},
            "health_check": {"enabled": False},
            "timeouts": {"connect_s": 2.0, "read_s": 10.0},
            "retry": {"max_attempts": 1},
        }
        server = {"host": "127.0.0.1", "port": self.port, **config.pop("server", {})}
        self.config = {**base, **config, "server": server}
        self.tls = "tls" in server
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        verify: ssl.SSLContext | bool = client_context(self.ca) if self.tls else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=15, **kwargs)

    def __enter__(self) -> TLSGateway:
        path = self.work_dir / f"gateway-{self.port}.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [*bastion_command(), "serve", "--config", str(path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        self.process = ManagedProcess(argv, self.work_dir / f"gateway-{self.port}.log", env=env)
        self.process.spawn()
        deadline = time.monotonic() + 30
        with self.client() as client:
            while True:
                if not self.process.alive():
                    raise RuntimeError(f"gateway exited:\n{self.process.output()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/healthz").status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    self.process.stop()
                    raise RuntimeError(f"gateway did not start:\n{self.process.output()}")
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            if exc[0] is not None:
                print(self.process.output(), file=sys.stderr)
            self.process.stop()


def upstream_entry(up: TLSUpstream, **tls: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": up.name, "url": up.url, "models": up.models}
    if tls:
        entry["tls"] = {k: str(v) if isinstance(v, Path) else v for k, v in tls.items()}
    return entry


def ask(gw: TLSGateway, model: str) -> httpx.Response:
    with gw.client() as client:
        return client.post("/v1/chat/completions", json=chat_body(model, "ping"))


def test_gateway_serves_https_with_hsts_and_two_workers(pki: PKI, tmp_path: Path) -> None:
    with (
        TLSUpstream("secure", ["tls-model"], upstream_server_context(pki)) as up,
        TLSGateway(
            tmp_path,
            {
                "server": {
                    "workers": 2,
                    "max_header_bytes": 4096,
                    "tls": {"certfile": str(pki.server_cert), "keyfile": str(pki.server_key)},
                },
                "upstreams": [upstream_entry(up, ca_file=pki.ca)],
            },
            pki.ca,
        ) as gw,
    ):
        with gw.client() as client:
            for _ in range(4):  # connections land on either worker
                response = client.get("/healthz", headers={"connection": "close"})
                assert response.status_code == 200
                hsts = response.headers["strict-transport-security"]
                assert hsts == "max-age=31536000; includeSubDomains"
            # server.max_header_bytes reaches every worker's listener, over TLS too.
            response = client.get("/healthz", headers={"x-pad": "p" * 3000})
            assert response.status_code == 200
            response = client.get("/healthz", headers={"x-pad": "p" * 5000})
            assert response.status_code == 431
            assert response.json()["error"]["code"] == "request_headers_too_large"
            assert response.headers["strict-transport-security"] == hsts
        for _ in range(4):
            refused(gw.port, client_context(None, version=ssl.TLSVersion.TLSv1_1))
            assert echo_status(gw.port, client_context(pki.ca, version=ssl.TLSVersion.TLSv1_2))
        response = ask(gw, "tls-model")
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        assert text == expected_text("secure", "tls-model", "ping")


def echo_status(port: int, ctx: ssl.SSLContext) -> bool:
    return https_get(port, ctx, "/healthz").status == 200


def test_plain_http_gateway_sends_no_hsts(pki: PKI, tmp_path: Path) -> None:
    with (
        TLSUpstream("secure", ["tls-model"], upstream_server_context(pki)) as up,
        TLSGateway(tmp_path, {"upstreams": [upstream_entry(up, ca_file=pki.ca)]}, pki.ca) as gw,
        gw.client() as client,
    ):
        response = client.get("/healthz")
        assert response.status_code == 200
        assert "strict-transport-security" not in response.headers


def test_https_upstream_verification(pki: PKI, tmp_path: Path) -> None:
    models = ["m-verified", "m-system", "m-unverified"]
    with contextlib.ExitStack() as stack:
        up = {
            m: stack.enter_context(TLSUpstream(m, [m], upstream_server_context(pki)))
            for m in models
        }
        entries = [
            upstream_entry(up["m-verified"], ca_file=pki.ca),
            upstream_entry(up["m-system"]),  # the system CAs do not know trustme's
            upstream_entry(up["m-unverified"], verify=False),
        ]
        with TLSGateway(tmp_path, {"upstreams": entries}, pki.ca) as gw:
            assert ask(gw, "m-verified").status_code == 200
            refused_upstream = ask(gw, "m-system")
            assert refused_upstream.status_code == 502, refused_upstream.text
            assert ask(gw, "m-unverified").status_code == 200
            assert gw.process is not None
            assert "verification is off towards upstream m-unverified" in gw.process.output()


def test_upstream_requiring_a_client_certificate(pki: PKI, tmp_path: Path) -> None:
    ctx = upstream_server_context(pki, client_ca=pki.client_ca)
    with (
        TLSUpstream("m-cert", ["m-cert"], ctx) as with_cert,
        TLSUpstream("m-nocert", ["m-nocert"], ctx) as without_cert,
    ):
        client_cert = {"client_certfile": pki.client_cert, "client_keyfile": pki.client_key}
        entries = [
            upstream_entry(with_cert, ca_file=pki.ca, **client_cert),
            upstream_entry(without_cert, ca_file=pki.ca),
        ]
        with TLSGateway(tmp_path, {"upstreams": entries}, pki.ca) as gw:
            response = ask(gw, "m-cert")
            assert response.status_code == 200, response.text
            assert ask(gw, "m-nocert").status_code == 502


def test_upstreams_at_one_url_must_agree_on_tls(pki: PKI) -> None:
    url = "https://llm.internal:8443"

    def upstream(name: str, url: str = url, **tls: Any) -> UpstreamSettings:
        document = {"name": name, "url": url, "models": [name], "tls": tls}
        return UpstreamSettings.model_validate(document)

    same = [upstream(n, ca_file=pki.ca) for n in "ab"]
    assert list(upstream_ssl_contexts(same)) == [url]
    other = upstream("c", verify=False)
    with pytest.raises(TLSConfigError, match=r"upstreams\.c\.tls: differs from upstream a"):
        upstream_ssl_contexts([*same, other])
    assert upstream_ssl_contexts([upstream("p", "http://llm.internal:8000")]) == {}


def test_client_certificate_acts_as_a_principal(pki: PKI, tmp_path: Path) -> None:
    """mTLS without a key: the certificate's subject is looked up in auth.client_certificates."""
    subject = "CN=billing-app,OU=payments,O=Example Bank"
    with (
        TLSUpstream("secure", ["tls-model", "other-model"], upstream_server_context(pki)) as up,
        TLSGateway(
            tmp_path,
            {
                "dev": False,
                "signing_key_file": str(signing_key_beside(tmp_path / "bastion.db")),
                "auth": {
                    "enabled": True,
                    "client_certificates": [
                        {"subject": subject, "roles": ["app"], "models": ["tls-model"]}
                    ],
                },
                "server": {
                    "tls": {
                        "certfile": str(pki.server_cert),
                        "keyfile": str(pki.server_key),
                        "client_ca": str(pki.client_ca),
                        "client_cert": "optional",
                    }
                },
                "upstreams": [upstream_entry(up, ca_file=pki.ca)],
            },
            pki.ca,
        ) as gw,
    ):
        certified = client_context(pki.ca, cert=(pki.client_cert, pki.client_key))
        with httpx.Client(base_url=gw.url, verify=certified, timeout=15) as client:
            answer = client.post("/v1/chat/completions", json=chat_body("tls-model", "ping"))
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == expected_text(
                "secure", "tls-model", "ping"
            )
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tls-model"]
            other = client.post("/v1/chat/completions", json=chat_body("other-model", "x"))
            assert other.status_code == 403  # the certificate's own allow-list
            assert client.get("/admin/keys").status_code == 403  # role app only
        with gw.client() as anonymous:  # TLS without a client certificate: no principal
            assert (
                anonymous.post("/v1/chat/completions", json=chat_body("tls-model", "x")).status_code
                == 401
            )
