"""The fleet: how long until a model is warm on every node, and how much of the bucket it
took. One run, every row on the same files and the same machine:

    python bench/fleet.py                  # 1 GB model, 3 nodes
    python bench/fleet.py --gb 0.5 --nodes 3

Rows (each a fresh redis-server and fresh ``warmpool serve`` processes, one per node,
each with its own node name and runtime directory; SeaweedFS is the bucket):

- **one node alone**: the model's fill on a single node, from the bucket (the yardstick);
- **every node from the bucket**: ``nodes: all`` with peers off, as before this round;
- **cooperative first fill**: ``nodes: all`` with peers on (one node reads the bucket,
  the others read from it);
- **a node joining later**: one more node starts while the others hold the model warm;
  its fill comes from them;
- **NIXL raw**: one READ of the same size between two bare processes (UCX as the nodes
  use it): the ceiling of a peer read here.

Bucket bytes are the nodes' own accounting (each entry's ``bytes - peer_bytes``); the
tests count the same thing at the wire (tests/test_peers.py). Results go to
``bench/results/fleet-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _seaweed import seaweedfs
from report import wait, write_report

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
PREFIX = "fleet/model/"
MiB = 1 << 20
FAST = {"WARMPOOL_HEARTBEAT_S": "0.5", "WARMPOOL_RECHECK_S": "0.5",
        "WARMPOOL_CLAIM_IDLE_S": "2", "WARMPOOL_SHUTDOWN_GRACE_S": "3"}

NIXL_CHILD = r'''
import json, mmap, os, sys, time, torch
from nixl._api import nixl_agent, nixl_agent_config
role, size, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
agent = nixl_agent(role, nixl_agent_config(backends=["UCX"]))
if role == "seed":
    buf = torch.randint(0, 255, (size,), dtype=torch.uint8)
    agent.register_memory(buf)
    open(where + ".meta", "wb").write(agent.get_agent_metadata())
    json.dump({"addr": buf.data_ptr()}, open(where + ".json", "w"))
    time.sleep(600)
else:
    peer = agent.add_remote_agent(open(where + ".meta", "rb").read())
    addr = json.load(open(where + ".json"))["addr"]
    unit = 64 << 20
    rates = {}
    for kind in ("fresh", "faulted", "fresh", "faulted"):
        # "fresh": a new shared-memory segment, as a node fills (its pages fault during
        # the read); "faulted": memory touched beforehand (the transport alone)
        name = f"/dev/shm/wpb-nixl-{os.getpid()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(name)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        os.close(fd)
        dst = torch.frombuffer(m, dtype=torch.uint8)
        if kind == "faulted":
            dst.fill_(1)
        t0 = time.perf_counter()
        reg = agent.register_memory(dst)
        local = agent.get_xfer_descs([dst[o:o + unit] for o in range(0, size, unit)])
        remote = agent.get_xfer_descs([(addr + o, min(unit, size - o), 0)
                                       for o in range(0, size, unit)], "DRAM")
        h = agent.initialize_xfer("READ", local, remote, peer)
        state = agent.transfer(h)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(h)
        agent.release_xfer_handle(h)
        rate = size / (time.perf_counter() - t0)
        rates[kind] = max(rates.get(kind, 0.0), rate / 1e9)
        agent.deregister_memory(reg)
        del dst, local
        m.close()
    print("RESULT " + json.dumps({**rates, "state": state}), flush=True)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_model(client: Any, gb: float, shards: int) -> int:
    import torch
    from safetensors.torch import save

    per = int(gb * 1e9 / shards) // 2 * 2
    total = 0
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        t = torch.randint(-30000, 30000, (per // 2,), dtype=torch.int16, generator=gen)
        data = save({f"layers.{k}.w": t.view(torch.bfloat16)})
        client.put_object(Bucket=BUCKET, Key=PREFIX + name, Body=data)
        total += len(data)
        weight_map[f"layers.{k}.w"] = name
    client.put_object(Bucket=BUCKET, Key=PREFIX + "model.safetensors.index.json",
                      Body=json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    client.put_object(Bucket=BUCKET, Key=PREFIX + "config.json",
                      Body=json.dumps({"model_type": "llama"}).encode())
    return total


class Cluster:
    """A redis-server and ``warmpool serve`` processes on it."""

    def __init__(self, work: Path, env: dict[str, str], peers: bool) -> None:
        self.work = work
        self.env = env
        self.peers = peers
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis.from_url(self.redis_url)
        wait(lambda: _ping(self.client), "redis-server")
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._roots: list[Path] = []

    def start(self, name: str) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"wpb-{name}-"))
        config = {"node": name, "runtime_dir": str(root / "run"),
                  "cache_dir": str(root / "cache"), "redis_url": self.redis_url}
        if self.peers:
            config["peers"] = {"enabled": True, "interface": "lo"}
        (root / "config.json").write_text(json.dumps(config))
        log = open(self.work / f"{name}-{'peers' if self.peers else 'bucket'}.log", "ab")
        self.nodes[name] = subprocess.Popen(
            [sys.executable, "-m", "warmpool", "serve", "--metrics-port", "-1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            env={**self.env, **FAST, "WARMPOOL_CONFIG": str(root / "config.json")})
        self._roots.append(root)
        wait(lambda: self.client.exists(f"warmpool:node:{name}"), f"node {name}", 120)

    def warm(self, uri: str) -> dict[str, dict[str, Any]]:
        found = {}
        for key in self.client.smembers("warmpool:entries"):
            raw = self.client.hget(key, "entry")
            if raw is None:
                continue
            entry = json.loads(raw)
            if entry["uri"] == uri and entry["state"] == "warm":
                found[entry["node"]] = entry
            if entry["uri"] == uri and entry["state"] == "failed":
                raise RuntimeError(f"{entry['node']}: {entry['error']}")
        return found

    def deploy_all(self, uri: str, count: int, timeout: float = 900) -> tuple[float, dict]:
        started = time.perf_counter()
        # the shared stream, not pub/sub: a request is kept until a controller takes it
        self.client.xadd("warmpool:requests", {"payload": json.dumps(
            {"action": "deploy", "uri": uri, "nodes": "all"})})
        entries = wait(lambda: (w := self.warm(uri)) and len(w) >= count and w,
                       f"{uri} warm on {count} node(s)", timeout, 0.05)
        return time.perf_counter() - started, entries

    def close(self) -> None:
        for proc in self.nodes.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.redis.kill()
        self.redis.wait()
        from warmpool.pool.host import HostTier

        for root in self._roots:  # a stopped node keeps its pool: this one is a bench's
            HostTier(root / "run").remove_all()
            shutil.rmtree(root, ignore_errors=True)


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def prime_memory(gb: float) -> float:
    """Touch ``gb`` of shared memory once, and free it; returns the GB/s of that touch.

    On the lent VMs the first touch of guest memory that the host has not backed yet runs
    at ~0.25 GB/s, against ~1.5 GB/s once backed (measured 2026-12-07: the first 2 GB
    fast, then 0.25 GB/s until the VM had touched 12 GB once). Without this, whichever
    row first reaches new memory is slowed by the VM, not by what it measures."""
    import mmap

    size = int(gb * 1e9) // 4096 * 4096
    name = f"/dev/shm/wpb-prime-{os.getpid()}"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(name)
    try:
        os.ftruncate(fd, size)
        started = time.perf_counter()
        with mmap.mmap(fd, size) as m:
            step = 1 << 28
            for off in range(0, size, step):
                n = min(step, size - off)
                m[off:off + n:4096] = b"\1" * len(range(0, n, 4096))
        return size / (time.perf_counter() - started) / 1e9
    finally:
        os.close(fd)


def fill_seconds(entry: dict[str, Any]) -> float:
    """From its first state to warm, by the entry's own history."""
    times = [t for _, t in entry["history"]]
    return times[-1] - times[0]


def nixl_raw(size: int, env: dict[str, str]) -> tuple[float, float]:
    """GB/s of one READ of ``size`` bytes between two bare processes: into a fresh
    shared-memory segment (what a node fills), and into memory already faulted."""
    where = tempfile.mktemp(prefix="wpb-nixl-")
    child = Path(where + ".py")
    child.write_text(NIXL_CHILD)
    seed = subprocess.Popen([sys.executable, str(child), "seed", str(size), where],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait(lambda: Path(where + ".json").exists(), "the NIXL seed", 60)
        out = subprocess.run([sys.executable, str(child), "read", str(size), where],
                             capture_output=True, text=True, env=env, timeout=600)
        [line] = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        rates = json.loads(line[7:])
        return float(rates["fresh"]), float(rates["faulted"])
    finally:
        seed.kill()
        seed.wait()
        for suffix in (".py", ".json", ".meta"):
            Path(where + suffix).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="vm")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' logs")
    args = parser.parse_args()
    prime = prime_memory(args.gb * (args.nodes + 3) + 2)
    print(f"primed the VM's memory at {prime:.2f} GB/s", flush=True)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="wpb-fleet-"))
    rows: list[dict[str, Any]] = []
    with seaweedfs(work / "seaweed") as weed:
        env = {**os.environ, **weed.env(), "UCX_NET_DEVICES": "lo"}
        client = weed.client()
        client.create_bucket(Bucket=BUCKET)
        size = make_model(client, args.gb, args.shards)
        uri = f"s3://{BUCKET}/{PREFIX}"
        print(f"model: {size / 1e9:.2f} GB in {args.shards} shards", flush=True)

        def scenario(label: str, peers: bool, count: int, join: bool = False) -> None:
            cluster = Cluster(work, env, peers)
            try:
                for k in range(count):
                    cluster.start(f"{'p' if peers else 'b'}{k}")
                seconds, entries = cluster.deploy_all(uri, count)
                bucket = sum(e["bytes"] - e.get("peer_bytes", 0) for e in entries.values())
                rows.append({"row": label, "nodes": count, "seconds": seconds,
                             "bucket_bytes": bucket, "size": size,
                             "fills": {n: round(fill_seconds(e), 3)
                                       for n, e in entries.items()}})
                print(rows[-1], flush=True)
                if join:
                    name = f"p{count}"
                    started = time.perf_counter()
                    cluster.start(name)
                    entry = wait(lambda: cluster.warm(uri).get(name),
                                 "the joining node warm", 600, 0.05)
                    rows.append({"row": "a node joining later (peers warm)", "nodes": 1,
                                 "seconds": time.perf_counter() - started,
                                 "fill_s": fill_seconds(entry),
                                 "bucket_bytes": entry["bytes"] - entry["peer_bytes"],
                                 "size": size,
                                 "gb_per_s": entry["bytes"] / fill_seconds(entry) / 1e9})
                    print(rows[-1], flush=True)
            finally:
                cluster.close()

        scenario("one node alone (bucket)", False, 1)
        scenario("every node from the bucket (peers off)", False, args.nodes)
        scenario("cooperative first fill (peers on)", True, args.nodes, join=True)
        raw, raw_faulted = nixl_raw(size, env)
        rows.append({"row": "NIXL raw READ, two processes, into a fresh segment",
                     "gb_per_s": raw, "size": size})
        rows.append({"row": "NIXL raw READ, two processes, into faulted memory",
                     "gb_per_s": raw_faulted, "size": size})
        print(rows[-2:], flush=True)
    load_after = os.getloadavg()
    alone = rows[0]["seconds"]
    lines = [f"# Fleet fill: {args.nodes} nodes, {size / 1e9:.2f} GB in SeaweedFS",
             "", f"Load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
             f"{os.cpu_count()} cores, every node a `warmpool serve` process on this machine. "
             f"Shared memory was touched once beforehand ({prime:.2f} GB/s): see "
             "`prime_memory`.",
             "", "| row | nodes | until all warm (s) | vs one node | bucket bytes / size | "
             "rate (GB/s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        secs = r.get("seconds")
        lines.append("| {} | {} | {} | {} | {} | {} |".format(
            r["row"], r.get("nodes", ""), f"{secs:.2f}" if secs else "",
            f"{secs / alone:.2f}x" if secs else "",
            f"{r['bucket_bytes'] / r['size']:.2f}" if "bucket_bytes" in r else "",
            f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else ""))
    join = next((r for r in rows if r["row"].startswith("a node joining")), None)
    if join:
        lines += ["", f"The joining node's fill: {join['fill_s']:.2f} s, "
                  f"{join['gb_per_s']:.2f} GB/s = {join['gb_per_s'] / raw:.0%} of NIXL's raw "
                  "rate into a fresh segment measured above (what a node's fill is: its "
                  "pages fault as the bytes land), "
                  f"{join['gb_per_s'] / raw_faulted:.0%} of the rate into faulted memory. "
                  "Its fill is timed by its entry's history (first state to warm: metadata, "
                  "the ask for a lease, the read, the checksums)."]
    path = write_report(args.out, f"fleet-{args.name}", lines,
                        {"rows": rows, "load": [load_before, load_after]})
    print(path.read_text())
    if args.keep:
        shutil.rmtree(work / "seaweed", ignore_errors=True)
        print(f"the nodes' logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
