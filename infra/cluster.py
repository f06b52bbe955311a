"""`just cluster`: a 3-node NATS cluster (JetStream R3) on loopback, two workers and two gateways,
each attached to a different node, all in the foreground (Ctrl-C stops everything).

Node i listens for clients on BASE+i and for routes on BASE+100+i (BASE = CY_LLM_CLUSTER_BASE_PORT, 4230).
Gateways serve /api/v1 on 8081/8082 and /v1 on 8001/8002. Every service gets the full server list with its
home node first, so it fails over to a surviving node when its own dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.nats import nats_server_binary, wait_for_port, write_config
from infra.shutdown import catch_stop_signals, stop_in_order
from infra.up import load_secret
from services.runtime import data_dir


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


def plan(base_port: int, size: int = 3) -> list[Node]:
    return [Node(f"n{i + 1}", base_port + i + 1, base_port + 100 + i + 1) for i in range(size)]


def start_node(node: Node, nodes: list[Node], root: Path, token: str = "") -> subprocess.Popen[bytes]:
    store = root / node.name
    store.mkdir(parents=True, exist_ok=True)
    routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in nodes if n is not node)
    cluster = f"cluster {{ name: cy-llm, listen: 127.0.0.1:{node.route_port}, routes: [{routes}] }}\n"
    conf = write_config(
        store / "nats.conf",
        port=node.client_port,
        store_dir=store / "js",
        token=token,
        server_name=node.name,
        extra=cluster,
    )
    log = open(store / "nats.log", "ab")
    return subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)


def plan_free(size: int = 3) -> list[Node]:
    """Like `plan`, on ports the OS reports free right now (all held open at once, so all distinct)."""
    socks = []
    try:
        for _ in range(2 * size):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
    return [Node(f"n{i + 1}", ports[i], ports[size + i]) for i in range(size)]


def start_cluster(
    root: Path, nodes: list[Node], token: str = "", timeout: float = 30.0
) -> list[subprocess.Popen[bytes]]:
    """Start every node and wait until each accepts clients; a node that exits fails at once with its log."""
    procs = [start_node(n, nodes, root, token) for n in nodes]
    for node, proc in zip(nodes, procs, strict=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_for_port(node.client_port, timeout=0.5)
                break
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                    log = (root / node.name / "nats.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"cluster node {node.name} did not start: {log}") from None
    return procs


def servers_for(home: Node, nodes: list[Node]) -> str:
    """CY_LLM_NATS_URL value: home node first, the others as failover."""
    return ",".join([home.url] + [n.url for n in nodes if n is not home])


def main() -> int:
    data = data_dir()
    root = data / "cluster"
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    api_key, _ = load_secret(env, "CY_LLM_API_KEY", data / "api_key")
    token, _ = load_secret(env, "CY_LLM_INTERNAL_TOKEN", data / "internal_token")
    base = int(env.get("CY_LLM_CLUSTER_BASE_PORT", "4230"))
    env.update(CY_LLM_API_KEY=api_key, CY_LLM_INTERNAL_TOKEN=token, CY_LLM_DATA_DIR=str(data), CY_LLM_JS_REPLICAS="3")
    nodes = plan(base)
    procs = start_cluster(root, nodes, token)
    print("[cluster] nodes: " + ", ".join(f"{n.name}={n.url}" for n in nodes), flush=True)
    time.sleep(2)  # let the JetStream meta group elect a leader before the services create R3 streams
    layout = [
        ("worker", nodes[1], {"CY_LLM_WORKER_ID": "cluster-w1"}),
        ("worker", nodes[2], {"CY_LLM_WORKER_ID": "cluster-w2"}),
        ("gateway", nodes[0], {"CY_LLM_PORT": "8081", "CY_LLM_LITE_PORT": "8001"}),
        ("gateway", nodes[2], {"CY_LLM_PORT": "8082", "CY_LLM_LITE_PORT": "8002"}),
        # Its own outputs folder, which no worker reads: trained adapters reach the workers (each caching them
        # under its data dir) through the object store only, so a job started on :8081 is served on :8082.
        ("trainer", nodes[1], {"CY_LLM_TRAINER_ID": "cluster-t1", "CY_LLM_OUTPUTS_DIR": str(root / "trainer-outputs")}),
    ]
    modules = {"worker": "services.engine", "gateway": "gateway", "trainer": "services.trainer"}
    for kind, home, extra in layout:
        module = modules[kind]
        penv = dict(env, CY_LLM_NATS_URL=servers_for(home, nodes), **extra)
        procs.append(subprocess.Popen([sys.executable, "-m", module], env=penv))
        print(f"[cluster] {kind} {extra} -> {home.name}", flush=True)
    print(
        f"[cluster] REST on :8081 and :8082 (X-API-Key {api_key}); kill a node with: kill <pid of its nats-server>",
        flush=True,
    )
    stop = catch_stop_signals()
    while not stop.requested:
        time.sleep(0.5)
    stop_in_order(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
