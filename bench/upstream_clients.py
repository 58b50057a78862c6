"""How much CPU does one upstream request cost the gateway, per client library?

Runs each of Bastion's upstream transports (gateway/transport.py: httptools, aiohttp,
httpx, httpx-aiohttp) in a loop of 32 concurrent workers against nginx answering a fixed
chat completion, the client pinned to core 0 and nginx to core 1, and prints requests/s
and CPU microseconds per request of the client process, side by side from one run.

    .venv/bin/python bench/upstream_clients.py [--requests 20000] [--transports a,b]

Needs nginx (apt). Nothing here is run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, how can I help?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
    }
)
REQUEST = b'{"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}'
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
  uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 10000000;
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nginx(port: int, prefix: Path) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, body=BODY))
    argv = ["taskset", "-c", "1", nginx, "-c", str(conf), "-p", str(prefix)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("nginx did not start (apt-get install -y nginx)")


async def measure(name: str, url: str, requests: int, concurrency: int) -> dict[str, float]:
    from bench.upstream_transports import build_transport

    transport = build_transport(name, 2.0, 30.0)  # type: ignore[arg-type]
    headers = {"content-type": "application/json", "accept": "application/json"}

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await transport.send("POST", url, headers, REQUEST)
            body = await response.read()
            assert response.status == 200 and body == BODY.encode(), (response.status, body)

    await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm the pool
    per_worker = requests // concurrency
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await transport.aclose()
    done = per_worker * concurrency
    return {"rps": done / wall, "cpu_us_per_request": cpu / done * 1e6}


def run_one(name: str, url: str, requests: int, concurrency: int) -> dict[str, float]:
    """In a fresh process pinned to core 0, so the libraries do not share a heap or loop."""
    code = (
        "import asyncio, json, sys, uvloop; sys.path.insert(0, sys.argv[5]);"
        "from bench.upstream_clients import measure;"
        "print(json.dumps(uvloop.run(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]),"
        " int(sys.argv[4])))))"
    )
    root = str(Path(__file__).resolve().parent.parent)
    argv = ["taskset", "-c", "0", sys.executable, "-c", code, name, url]
    argv += [str(requests), str(concurrency), root]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--transports", default="httptools,aiohttp,httpx-aiohttp,httpx")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bastion-clients-") as tmp:
        nginx = start_nginx(port, Path(tmp))
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results = {
                name: run_one(name, url, args.requests, args.concurrency)
                for name in args.transports.split(",")
            }
        finally:
            nginx.terminate()
            nginx.wait(10)
    base = results.get("httptools")
    print(f"\n{args.requests} POSTs, {args.concurrency} concurrent, client on core 0 (uvloop)")
    print(f"{'transport':<15}{'req/s':>10}{'CPU µs/req':>13}{'vs httptools':>15}")
    for name, result in results.items():
        ratio = f"{result['cpu_us_per_request'] / base['cpu_us_per_request']:.1f}x" if base else ""
        print(f"{name:<15}{result['rps']:>10.0f}{result['cpu_us_per_request']:>13.1f}{ratio:>15}")
    print(f"(load average at the end: {os.getloadavg()[0]:.2f}; compare only within one run)")


if __name__ == "__main__":
    main()
