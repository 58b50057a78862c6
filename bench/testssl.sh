#!/usr/bin/env bash
# Audit the gateway's TLS listener with testssl.sh (Debian: apt-get install testssl.sh).
#
# Starts `bastion serve` with TLS on a free loopback port (a throw-away trustme CA and
# server certificate, an upstream that is never called, health checks off), runs
# testssl.sh against it, prints a short summary, keeps the full JSON under bench/results/
# and stops the gateway. Exits 1 when SSLv2, SSLv3, TLS 1.0 or TLS 1.1 or a weak cipher
# is offered, or on a HIGH/CRITICAL finding other than about the throw-away certificate;
# 2 when the audit itself could not run.
#
# Usage:  bash bench/testssl.sh
#   KEY_TYPE=rsa|ecdsa   server key (default rsa: the RSA and DHE suites get tested)
#   WORKERS=N            gateway worker processes (default 1)
#   TESTSSL=path         the testssl.sh to run (default: testssl or testssl.sh in PATH)
#   TESTSSL_ARGS=...     replaces the default checks (see below)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
python="$root/.venv/bin/python"
bastion="$root/.venv/bin/bastion"
key_type="${KEY_TYPE:-rsa}"
workers="${WORKERS:-1}"
testssl="${TESTSSL:-$(command -v testssl || command -v testssl.sh || true)}"
# -p protocols, -s cipher categories, -E every cipher per protocol, -f forward secrecy,
# -P server preference, -S certificate and defaults, -h headers (HSTS), -U vulnerabilities.
read -r -a checks <<<"${TESTSSL_ARGS:--p -s -E -f -P -S -h -U}"

if [[ -z "$testssl" ]]; then
    echo "testssl: testssl.sh not found (apt-get install testssl.sh)" >&2
    exit 2
fi
[[ -x "$bastion" ]] || { echo "testssl: $bastion missing (make dev first)" >&2; exit 2; }

work="$(mktemp -d -t bastion-testssl-XXXXXX)"
gateway_pid=""
cleanup() {
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$gateway_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Certificates, secrets, configuration, a free port.
port="$("$python" - "$work" "$key_type" <<'EOF'
import base64, datetime, os, socket, sys
import trustme, yaml

work, key_type = sys.argv[1], getattr(trustme.KeyType, sys.argv[2].upper())
ca = trustme.CA(key_type=key_type)
# 90 days, like a real certificate (trustme's default runs from 2000 to 3000).
now = datetime.datetime.now(datetime.timezone.utc)
validity = {"not_before": now - datetime.timedelta(days=1), "not_after": now + datetime.timedelta(days=89)}
leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=key_type, **validity)
ca.cert_pem.write_to_path(f"{work}/ca.pem")
leaf.cert_chain_pems[0].write_to_path(f"{work}/server.pem")
leaf.private_key_pem.write_to_path(f"{work}/server.key")
with open(f"{work}/master.key", "w") as out:
    out.write(base64.b64encode(os.urandom(32)).decode())
# The audit log's signing key: without one, serve refuses to start (audit is on).
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
with open(f"{work}/signing.pem", "wb") as out:
    out.write(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
config = {
    "server": {
        "host": "127.0.0.1",
        "port": port,
        "tls": {"certfile": f"{work}/server.pem", "keyfile": f"{work}/server.key"},
    },
    "upstreams": [{"name": "none", "url": "http://127.0.0.1:9", "models": ["bench-model"]}],
    "health_check": {"enabled": False},
    "rate_limits": {"enabled": False},
    "master_key_file": f"{work}/master.key",
    "signing_key_file": f"{work}/signing.pem",
    "database_url": f"sqlite:///{work}/bastion.db",
}
with open(f"{work}/bastion.yaml", "w") as out:
    yaml.safe_dump(config, out, sort_keys=False)
print(port)
EOF
)"

env -u BASTION_CONFIG "$bastion" serve --config "$work/bastion.yaml" --workers "$workers" \
    >"$work/gateway.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 200); do
    if curl -fsS --cacert "$work/ca.pem" "https://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        echo "testssl: the gateway exited:" >&2
        cat "$work/gateway.log" >&2
        exit 2
    fi
    sleep 0.1
done
curl -fsS --cacert "$work/ca.pem" "https://127.0.0.1:$port/healthz" >/dev/null || {
    echo "testssl: the gateway did not answer on https://127.0.0.1:$port" >&2
    cat "$work/gateway.log" >&2
    exit 2
}

mkdir -p "$here/results"
stamp="$(date +%Y%m%d-%H%M%S)"
json="$here/results/testssl-$key_type-$stamp.json"
log="$here/results/testssl-$key_type-$stamp.log"
echo "testssl: $("$testssl" --version 2>/dev/null | grep -m1 -o 'testssl.sh *[0-9][^ ]*' || echo "$testssl")" \
    "against https://127.0.0.1:$port ($key_type key, $workers worker(s)); a few minutes"
started=$SECONDS
set +e
"$testssl" --quiet --color 0 --warnings off --sneaky --add-ca "$work/ca.pem" \
    --jsonfile "$json" "${checks[@]}" "127.0.0.1:$port" >"$log" 2>&1
testssl_rc=$?
set -e
echo "testssl: done in $((SECONDS - started))s (exit $testssl_rc); full output in $log"
if [[ ! -s "$json" ]]; then
    echo "testssl: no JSON written; output tail:" >&2
    tail -30 "$log" >&2
    exit 2
fi

"$python" - "$json" <<'EOF'
"""Summarise testssl.sh's flat JSON; exit 1 on an old protocol or a weak cipher."""
import json
import sys

path = sys.argv[1]
findings = json.load(open(path))
by_id = {f["id"]: f for f in findings}
rank = {"CRITICAL": 5, "HIGH": 4, "MEDIUM": 3, "LOW": 2, "WARN": 1, "OK": 0, "INFO": 0}
failures = []

protocols = ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"]
offered = []
for proto in protocols:
    finding = by_id.get(proto, {}).get("finding", "(not tested)")
    is_offered = finding.startswith("offered")
    if is_offered:
        offered.append(proto)
    if is_offered and proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        failures.append(f"{proto} is offered")
print("protocols offered:  ", ", ".join(offered) or "none")
old = [p for p in protocols[:4] if p in offered]
print("below TLS 1.2:      ", ", ".join(old) if old else "none offered")

# Cipher categories (-s): anything but the strong ones must be absent.
weak_lists = ["NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA", "OBSOLETED", "AVERAGE"]
for name in weak_lists:
    finding = by_id.get(f"cipherlist_{name}", {}).get("finding", "")
    if finding.startswith("offered"):
        failures.append(f"cipher category {name} is offered")
strong = by_id.get("cipherlist_STRONG", {}).get("finding", "(not tested)")
print("cipher categories:  ", "STRONG", strong, "; NULL/aNULL/EXPORT/LOW/3DES/CBC(obsoleted):",
      "offered" if any(f.startswith("cipher category") for f in failures) else "none")

# Every cipher offered (-E), with its rating.
ciphers = [f for f in findings if f["id"].startswith("cipher-") or f["id"].startswith("cipher_x")]
weak = [f for f in ciphers if rank.get(f["severity"], 0) >= rank["LOW"]]
print(f"ciphers offered:     {len(ciphers)}")
for f in ciphers:
    print(f"   {f['severity']:<8} {' '.join(f['finding'].split())}")
for f in weak:
    failures.append(f"weak cipher ({f['severity']}): {' '.join(f['finding'].split())}")
for key in ("cipher_order", "PFS", "PFS_ECDHE_curves", "DH_groups", "cipher_negotiated",
            "HSTS_time", "HSTS_subdomains", "TLS_session_ticket", "ALPN", "cert_chain_of_trust",
            "secure_renego", "secure_client_renego", "CRIME_TLS", "fallback_SCSV"):
    if key in by_id:
        print(f"{key + ':':<20} {' '.join(by_id[key]['finding'].split())}")

# The certificate is a throw-away one made above: its findings (no CRL/OCSP URI, private
# CA) say nothing about the gateway, so they are shown but do not fail the audit.
serious = [f for f in findings if rank.get(f["severity"], 0) >= rank["MEDIUM"]]
print(f"findings MEDIUM+:    {len(serious)}")
for f in serious:
    test_cert = f["id"].startswith("cert_")
    note = "  (throw-away test certificate, not judged)" if test_cert else ""
    print(f"   {f['severity']:<8} {f['id']}: {' '.join(f['finding'].split())}{note}")
    if rank[f["severity"]] >= rank["HIGH"] and not test_cert:
        failures.append(f"{f['severity']} finding {f['id']}")
if failures:
    print("RESULT: FAIL")
    for failure in failures:
        print("   -", failure)
    sys.exit(1)
print("RESULT: PASS (TLS 1.2+ only, no weak cipher)")
EOF
