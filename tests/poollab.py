"""A multi-node pool on one machine, for tests and benchmarks: a NetLab of N hosts, one `pool agent`
in each host's network namespace, and a coordinator (`pool serve`, local_node = false) in host n1's
namespace (so it reaches every agent's 10.231.x address); clients talk to it over its unix socket.

    with NetLab(3) as lab, PoolLab(lab, store_root, tmp) as pl:
        with pl.client() as c:
            inst = c.spawn("counter")               # inst.node in {"n1", "n2", "n3"}
        pl.get(inst.address, "/inc")                # HTTP from inside n1 to the copy's address
        pl.kill_agent("n2"); pl.start_agent("n2")   # fault injection, rejoin

Every TCP link is mutual TLS: the lab makes a cluster CA and one certificate per agent (its host's
name) and one for the coordinator (`coordinator`) in workdir/certs, removed by close().
PoolLab(..., tls=False) runs them with --insecure-plain-tcp instead (the plaintext control case).

PoolLab(..., etcd=URL) is a cluster on etcd: agents join with `--etcd URL` (one token for all),
coordinators find them there; start_coordinator("c2") starts another coordinator (its own socket,
client("c2")), kill_coordinator(name) SIGKILLs one.

Agents and the coordinator are killed with the lab. Copies of a SIGKILLed agent are orphans: this
process is made a child subreaper, so they become our children and kill_agent() ends and reaps them.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from tlscerts import Cluster

from pool.cli.demo import ROOT
from pool.cr.criu import become_subreaper

AGENT_PORT = 7070
COORDINATOR = "coordinator"   # the coordinator's certificate name


class PoolLab:
    def __init__(self, lab, store_root: Path, workdir: Path, *, extra_config: str = "",
                 agent_config: str = "", heartbeat_s: float = 0.5, tls: bool = True,
                 etcd: str | None = None, etcd_ttl: int = 3) -> None:
        become_subreaper()
        self.lab = lab
        self.store_root = Path(store_root)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = self.workdir / "pool.sock"
        self.agents: dict[str, subprocess.Popen] = {}
        self.tokens: dict[str, Path] = {}
        self.coordinator: subprocess.Popen | None = None
        self.etcd = etcd
        self.etcd_ttl = etcd_ttl
        self.coordinators: dict[str, subprocess.Popen] = {}   # besides self.coordinator
        self.agent_config = self.workdir / "agent.toml"
        self.agent_config.write_text(agent_config + (f"\n[etcd]\nttl = {etcd_ttl}\n" if etcd else ""))
        self.extra_config = extra_config
        self.heartbeat_s = heartbeat_s
        self.env = {**os.environ, "POOL_SOCKET": str(self.socket)}
        self.certs = Cluster(self.workdir / "certs") if tls else None

    def tls_args(self, node: str) -> list[str]:
        """pool agent / serve flags: node's TLS directory, or plain TCP."""
        if self.certs is None:
            return ["--insecure-plain-tcp"]
        return ["--tls-dir", str(self.certs.dir(node))]

    # -- agents -----------------------------------------------------------------------------------
    def token_file(self, host: str) -> Path:
        if self.etcd:   # agents that join all present the cluster's one agent token
            host = "agents"
        if host not in self.tokens:
            p = self.workdir / f"{host}.token"
            p.write_text(secrets.token_urlsafe(24))
            p.chmod(0o600)
            self.tokens[host] = p
        return self.tokens[host]

    def agent_store(self, host: str) -> Path:
        return self.workdir / f"store-{host}"

    def start_agent(self, host: str, *, tls_dir: Path | None = None,
                    name: str | None = None) -> subprocess.Popen:
        """The agent of host; tls_dir and name (default: host's own) make an impostor."""
        tls = ["--tls-dir", str(tls_dir)] if tls_dir else self.tls_args(host)
        log = open(self.workdir / f"agent-{host}.log", "ab")  # noqa: SIM115  closed below
        try:
            p = self.lab.popen(host, [
                sys.executable, "-m", "pool.cli", "agent",
                "--listen", f"{self.lab.address(host)}:{AGENT_PORT}",
                "--token-file", str(self.token_file(host)), "--store", str(self.agent_store(host)),
                "--run-dir", str(self.workdir / f"run-{host}"), "--config", str(self.agent_config),
                "--name", name or host, *tls, *(["--etcd", self.etcd] if self.etcd else [])],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        finally:
            log.close()
        self.agents[host] = p
        return p

    def kill_agent(self, host: str) -> None:
        """SIGKILL the agent, then end and reap whatever copies it left (they are orphans now)."""
        p = self.agents.pop(host)
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        self.reap_orphans(kids)

    def reap_orphans(self, known=()) -> None:
        mine = {q.pid for q in self.agents.values()} | ({self.coordinator.pid} if self.coordinator
                                                         else set()) \
            | {q.pid for q in self.coordinators.values()}
        deadline = time.monotonic() + 5
        while True:
            strays = [c for c in psutil.Process().children() if c.pid not in mine
                      and c.pid not in {q.pid for q in self.lab._procs}]
            strays += [k for k in known if k.is_running()]
            if not strays:
                return
            for c in strays:
                try:
                    c.kill()
                except psutil.Error:
                    pass
            for c in strays:
                try:
                    os.waitpid(c.pid, 0)
                except ChildProcessError:
                    pass
            known = ()
            if time.monotonic() > deadline:
                return

    def stop_agent(self, host: str, timeout: float = 30) -> int:
        p = self.agents.pop(host)
        p.send_signal(signal.SIGTERM)
        return p.wait(timeout)

    # -- the coordinator --------------------------------------------------------------------------
    def config_text(self) -> str:
        if self.etcd:
            return (f'[service]\nsource = "{self.lab.address("n1")}:0"\n'
                    f"heartbeat_s = {self.heartbeat_s}\n{self.extra_config}\n"
                    f'[etcd]\nendpoints = "{self.etcd}"\nttl = {self.etcd_ttl}\n'
                    f'agent_token_file = "{self.token_file("agents")}"\n')
        nodes = "".join(f'[nodes.{h}]\naddress = "{self.lab.address(h)}:{AGENT_PORT}"\n'
                        f'token_file = "{self.token_file(h)}"\n' for h in self.agents)
        return (f'[service]\nlocal_node = false\nsource = "{self.lab.address("n1")}:0"\n'
                f"heartbeat_s = {self.heartbeat_s}\n{self.extra_config}\n{nodes}")

    def socket_of(self, name: str = COORDINATOR) -> Path:
        return self.socket if name == COORDINATOR else self.workdir / f"{name}.sock"

    def start_coordinator(self, name: str = COORDINATOR, ready_timeout: float = 60) -> None:
        """A coordinator (with etcd, any number of them: each its own socket and run dir)."""
        cfg = self.workdir / f"{name}.toml"
        cfg.write_text(self.config_text())
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        try:
            proc = self.lab.popen("n1", [
                sys.executable, "-m", "pool.cli", "--store", str(self.store_root), "serve",
                "--socket", str(self.socket_of(name)), "--config", str(cfg),
                *self.tls_args(COORDINATOR)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**self.env, "POOL_RUN_DIR": str(self.workdir / f"run-{name}")})
        finally:
            log.close()
        if name == COORDINATOR:
            self.coordinator = proc
        else:
            self.coordinators[name] = proc
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("pool serve exited:\n" + self.log(name)[-3000:])
            try:
                with self.client(name) as c:
                    c.ping()
                return
            except Exception:  # noqa: BLE001  not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill_coordinator(self, name: str = COORDINATOR) -> None:
        """SIGKILL a coordinator (its etcd lease then expires by itself)."""
        proc = self.coordinator if name == COORDINATOR else self.coordinators.pop(name)
        if name == COORDINATOR:
            self.coordinator = None
        proc.kill()
        proc.wait(10)

    def wait_nodes_up(self, *hosts: str, timeout: float = 60, coordinator: str = COORDINATOR) -> dict:
        return self.wait_nodes(lambda rows: all(h in rows and rows[h]["healthy"] for h in hosts),
                               timeout, f"nodes {hosts} up", coordinator)

    def wait_nodes(self, cond, timeout: float = 30, what: str = "nodes",
                   coordinator: str = COORDINATOR) -> dict:
        deadline = time.monotonic() + timeout
        with self.client(coordinator) as c:
            while True:
                rows = {r["name"]: r for r in c.nodes()}
                if cond(rows):
                    return rows
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: {rows}\n" + self.log(coordinator)[-2000:])
                time.sleep(0.1)

    def client(self, coordinator: str = COORDINATOR):
        from pool.client import Client

        return Client(self.socket_of(coordinator), timeout=5)

    def log(self, who: str) -> str:
        """A coordinator's log (by its name) or an agent's (by its host)."""
        p = self.workdir / (f"agent-{who}.log" if who in self.lab.hosts else f"{who}.log")
        return p.read_text(errors="replace") if p.exists() else ""

    # -- reaching copies --------------------------------------------------------------------------
    def get(self, address: str, path: str = "/", src: str = "n1", timeout: float = 10) -> dict:
        """GET http://address/path from inside host src; the JSON body."""
        host, port = address.rsplit(":", 1)
        s = self.lab.socket(src)
        try:
            s.settimeout(timeout)
            s.connect((host, int(port)))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split()[1] == b"200", head
        return json.loads(body)

    # -- life -------------------------------------------------------------------------------------
    def start(self, hosts=None) -> "PoolLab":
        for h in hosts or self.lab.hosts:
            self.start_agent(h)
        self.start_coordinator()
        self.wait_nodes_up(*(hosts or self.lab.hosts))
        return self

    def close(self) -> None:
        for proc in [self.coordinator, *self.coordinators.values()]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.coordinators.clear()
        for h in list(self.agents):
            try:
                self.stop_agent(h)
            except subprocess.TimeoutExpired:
                self.kill_agent(h)
        self.reap_orphans()
        if self.certs is not None:
            shutil.rmtree(self.certs.root, ignore_errors=True)

    def __enter__(self) -> "PoolLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
