"""The gateway example in docs/audit.md runs as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from compliance.reader import AuditReader
from compliance.verify import LogVerifier
from tests.compliance.conftest import MASTER_KEY

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


async def test_the_gateway_example_runs(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    source = "async def example():\n" + textwrap.indent(block, "    ") + "    return writer\n"
    namespace: dict[str, Any] = {
        "engine": engine,
        "master_key": MASTER_KEY,
        "signing_key": signing_key,
        "rid": "req-1",
        "kid": "0123456789abcdef",
        "sid": "alice",
        "m": "dev-model",
        "body": {"messages": [{"role": "user", "content": "hi"}]},
        "text": "hello",
    }
    exec(compile(source, str(DOC), "exec"), namespace)
    writer = await namespace["example"]()
    report = LogVerifier(engine, [signing_key.public_key()]).verify()
    assert report.ok and report.entries == 1 and report.chains[0].closed
    reader = AuditReader(engine, writer.keyring)
    (entry,) = reader.entries(subject_id="alice")
    assert reader.payload(entry)["response"] == "hello"
