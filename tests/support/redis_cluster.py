"""Real Redis Cluster and Sentinel deployments on loopback, for tests and benchmarks.

- `start_redis_cluster`: `masters` x (1 + `replicas`) redis-server processes with
  ``--cluster-enabled yes``, joined by ``redis-cli --cluster create ... --cluster-replicas``;
  returns once every slot is served and every replica is in sync (so a killed master
  fails over to it). A short ``cluster-node-timeout`` makes a failover take seconds.
- `start_sentinel_group`: a master, a replica and 3 sentinels (quorum 2) watching them,
  for a real ``SENTINEL FAILOVER``.

Every wait is a bounded poll; `stop()` ends every process the helper started (also
when starting failed half way).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync

from tests.support.procs import REDIS_BIN, Proc, _spawn, free_port, start_redis, wait_until
from tests.support.tools import path_of


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so at most 55535."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _client(port: int) -> redis_sync.Redis:
    return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


def _ask(port: int, *args: object) -> object:
    with _client(port) as r:
        return r.execute_command(*args)


def kill(proc: Proc) -> None:
    """SIGKILL: a master that dies without a word (no shutdown, no failover handshake)."""
    if proc.popen.poll() is None:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(5)


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    master: bool
    master_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]


@dataclass
class RedisClusterProcs:
    nodes: list[Proc]
    workdir: Path
    node_timeout_ms: int
    stopped: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        """The shared tier's URL: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in self.nodes)

    def alive(self) -> list[Proc]:
        return [p for p in self.nodes if p.popen.poll() is None]

    def topology(self) -> list[Node]:
        """CLUSTER NODES as a live node sees it."""
        for proc in self.alive():
            try:
                text = _ask(proc.port, "CLUSTER", "NODES")
            except redis_sync.RedisError:
                continue
            return _parse_nodes(text.decode() if isinstance(text, bytes) else str(text))
        raise RuntimeError("no cluster node answers")

    def masters(self) -> list[Node]:
        return [n for n in self.topology() if n.master and not n.failed and n.slots]

    def proc(self, port: int) -> Proc:
        return next(p for p in self.nodes if p.port == port)

    def replica_of(self, master: Node) -> Node:
        return next(n for n in self.topology() if not n.master and n.master_id == master.id and not n.failed)

    def master_of_slot(self, slot: int) -> Node:
        return next(m for m in self.masters() if any(a <= slot <= b for a, b in m.slots))

    def keys_per_master(self) -> dict[int, int]:
        """DBSIZE of every master (port -> keys): how the keys spread."""
        return {m.port: int(_ask(m.port, "DBSIZE")) for m in self.masters()}  # type: ignore[call-overload]

    def bytes_per_master(self) -> dict[int, int]:
        """used_memory_dataset of every master (port -> bytes)."""
        out = {}
        for m in self.masters():
            with _client(m.port) as r:
                out[m.port] = int(r.info("memory")["used_memory_dataset"])
        return out

    def flush(self) -> None:
        for m in self.masters():
            _ask(m.port, "FLUSHALL")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every slot served (cluster_state:ok on every live node), every replica in sync."""
        def ok() -> bool:
            for proc in self.alive():
                info = _ask(proc.port, "CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:  # type: ignore[operator]
                    return False
                with _client(proc.port) as r:
                    repl = r.info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
            return True

        wait_until(ok, timeout, interval=0.1, what="redis cluster healthy")

    def kill_master(self, master: Node) -> Node:
        """SIGKILL `master`; returns the replica that should take its place."""
        replica = self.replica_of(master)
        kill(self.proc(master.port))
        self.stopped.add(master.port)
        return replica

    def wait_promoted(self, replica: Node, timeout: float = 30.0) -> None:
        """Until `replica` serves its old master's slots and every live node says ok."""
        def promoted() -> bool:
            me = next(n for n in self.topology() if n.id == replica.id)
            if not (me.master and me.slots):
                return False
            return all(b"cluster_state:ok" in _ask(p.port, "CLUSTER", "INFO")  # type: ignore[operator]
                       for p in self.alive())

        wait_until(promoted, timeout, interval=0.05, what=f"replica :{replica.port} promoted")

    def migrate_slot(self, slot: int, dst: Node, *, finish: bool = True) -> Node:
        """Move `slot` to `dst` the way redis-cli --cluster reshard does: IMPORTING,
        MIGRATING, MIGRATE of its keys; then (`finish`) SETSLOT NODE on every master.
        Returns the source master."""
        src = self.master_of_slot(slot)
        assert src.id != dst.id
        _ask(dst.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", src.id)
        _ask(src.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.id)
        self.move_keys(slot, src, dst)
        if finish:
            self.finish_migration(slot, dst)
        return src

    def move_keys(self, slot: int, src: Node, dst: Node, count: int | None = None) -> int:
        """MIGRATE `count` (all when None) of the slot's keys from src to dst."""
        moved = 0
        while count is None or moved < count:
            batch = 100 if count is None else min(100, count - moved)
            keys = _ask(src.port, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            _ask(src.port, "MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)  # type: ignore[misc]
            moved += len(keys)  # type: ignore[arg-type]
        return moved

    def finish_migration(self, slot: int, dst: Node) -> None:
        for m in self.masters():
            _ask(m.port, "CLUSTER", "SETSLOT", slot, "NODE", dst.id)

    def stop(self) -> None:
        for proc in self.nodes:
            proc.stop()


def _parse_nodes(text: str) -> list[Node]:
    out = []
    for line in text.strip().splitlines():
        parts = line.split()
        flags = parts[2].split(",")
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        slots = []
        for s in parts[8:]:
            if s.startswith("["):
                continue  # a slot being imported or migrated
            a, _, b = s.partition("-")
            slots.append((int(a), int(b or a)))
        out.append(Node(parts[0], port, "master" in flags, None if parts[3] == "-" else parts[3],
                        "fail" in flags or "fail?" in flags, tuple(slots)))
    return out


def start_redis_cluster(workdir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                        timeout: float = 60.0, extra_args: Iterable[str] = ()) -> RedisClusterProcs:
    """A real Redis Cluster on loopback: see the module docstring."""
    nodes: list[Proc] = []
    cluster = RedisClusterProcs(nodes, workdir, node_timeout_ms)
    try:
        for i in range(masters * (1 + replicas)):
            d = workdir / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            nodes.append(start_redis(d, port=cluster_port(), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
                *extra_args)))
        out = subprocess.run(
            [path_of("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        cluster.wait_healthy(timeout)
        wait_until(lambda: len(cluster.masters()) == masters
                   and sum(1 for n in cluster.topology() if not n.master) == masters * replicas,
                   timeout, what="every node known to every other")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelGroup:
    master: Proc
    replica: Proc
    sentinels: list[Proc]
    name: str = "gw"

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{self.name}/{db}"

    def master_port(self) -> int:
        """The master the sentinels name now."""
        for s in self.sentinels:
            try:
                addr = _ask(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except redis_sync.RedisError:
                continue
            if addr:
                return int(addr[1])  # type: ignore[index]
        raise RuntimeError("no sentinel names a master")

    def failover(self, timeout: float = 30.0) -> int:
        """SENTINEL FAILOVER; returns the new master's port once it is one and every
        sentinel names it."""
        old = self.master_port()
        new = self.replica.port if old == self.master.port else self.master.port
        _ask(self.sentinels[0].port, "SENTINEL", "FAILOVER", self.name)

        def done() -> bool:
            with _client(new) as r:
                if r.info("replication")["role"] != "master":
                    return False
            return all(int(_ask(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)[1]) == new  # type: ignore[index]
                       for s in self.sentinels)

        wait_until(done, timeout, interval=0.05, what="sentinel failover")
        return new

    def stop(self) -> None:
        for p in [*self.sentinels, self.replica, self.master]:
            p.stop()


def start_sentinel_group(workdir: Path, *, timeout: float = 30.0, name: str = "gw") -> SentinelGroup:
    """A master, its replica, and 3 sentinels (quorum 2) that know both."""
    started: list[Proc] = []
    try:
        master = start_redis(workdir / "master")
        started.append(master)
        replica = start_redis(workdir / "replica", extra_args=("--replicaof", "127.0.0.1", str(master.port)))
        started.append(replica)
        sentinels = []
        for i in range(3):
            port = free_port()
            conf = workdir / f"sentinel{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor {name} 127.0.0.1 {master.port} 2\n"
                            f"sentinel down-after-milliseconds {name} 1000\n"
                            f"sentinel failover-timeout {name} 5000\n")
            proc = _spawn([REDIS_BIN, str(conf), "--sentinel"], conf.parent, "sentinel", port=port)
            started.append(proc)
            sentinels.append(proc)
        group = SentinelGroup(master, replica, sentinels, name)

        def ready() -> bool:
            with _client(replica.port) as r:
                if r.info("replication").get("master_link_status") != "up":
                    return False
            for s in sentinels:
                with _client(s.port) as r:
                    known = r.execute_command("SENTINEL", "REPLICAS", name)
                    if not known:
                        return False
                    others = r.execute_command("SENTINEL", "SENTINELS", name)
                    if len(others) < 2:
                        return False
            return True

        wait_until(ready, timeout, interval=0.1, what="sentinels know the master, the replica and each other")
        return group
    except BaseException:
        for p in started:
            p.stop()
        raise
