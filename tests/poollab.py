"""A multi-node pool on one machine, for tests and benchmarks: a NetLab of N hosts, one `pool agent`
in each host's network namespace, and a coordinator (`pool serve`, local_node = false) in host n1's
namespace (so it reaches every agent's 10.231.x address); clients talk to it over its unix socket.

    with NetLab(3) as lab, PoolLab(lab, store_root, tmp) as pl:
        with pl.client() as c:
            inst = c.spawn("counter")               # inst.node in {"n1", "n2", "n3"}
        pl.get(inst.address, "/inc")                # HTTP from inside n1 to the copy's address
        pl.kill_agent("n2"); pl.start_agent("n2")   # fault injection, rejoin

Agents and the coordinator are killed with the lab. Copies of a SIGKILLed agent are orphans: this
process is made a child subreaper, so they become our children and kill_agent() ends and reaps them.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pool.cli.demo import ROOT
from pool.cr.criu import become_subreaper

AGENT_PORT = 7070


class PoolLab:
    def __init__(self, lab, store_root: Path, workdir: Path, *, extra_config: str = "",
                 agent_config: str = "", heartbeat_s: float = 0.5) -> None:
        become_subreaper()
        self.lab = lab
        self.store_root = Path(store_root)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = self.workdir / "pool.sock"
        self.agents: dict[str, subprocess.Popen] = {}
        self.tokens: dict[str, Path] = {}
        self.coordinator: subprocess.Popen | None = None
        self.agent_config = self.workdir / "agent.toml"
        self.agent_config.write_text(agent_config)
        self.extra_config = extra_config
        self.heartbeat_s = heartbeat_s
        self.env = {**os.environ, "POOL_SOCKET": str(self.socket)}

    # -- agents -----------------------------------------------------------------------------------
    def token_file(self, host: str) -> Path:
        if host not in self.tokens:
            p = self.workdir / f"{host}.token"
            p.write_text(secrets.token_urlsafe(24))
            p.chmod(0o600)
            self.tokens[host] = p
        return self.tokens[host]

    def agent_store(self, host: str) -> Path:
        return self.workdir / f"store-{host}"

    def start_agent(self, host: str) -> subprocess.Popen:
        log = open(self.workdir / f"agent-{host}.log", "ab")  # noqa: SIM115  closed below
        try:
            p = self.lab.popen(host, [
                sys.executable, "-m", "pool.cli", "agent",
                "--listen", f"{self.lab.address(host)}:{AGENT_PORT}",
                "--token-file", str(self.token_file(host)), "--store", str(self.agent_store(host)),
                "--run-dir", str(self.workdir / f"run-{host}"), "--config", str(self.agent_config),
                "--name", host], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
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
                                                         else set())
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
        nodes = "".join(f'[nodes.{h}]\naddress = "{self.lab.address(h)}:{AGENT_PORT}"\n'
                        f'token_file = "{self.token_file(h)}"\n' for h in self.agents)
        return (f'[service]\nlocal_node = false\nsource = "{self.lab.address("n1")}:0"\n'
                f"heartbeat_s = {self.heartbeat_s}\n{self.extra_config}\n{nodes}")

    def start_coordinator(self, ready_timeout: float = 60) -> None:
        cfg = self.workdir / "coordinator.toml"
        cfg.write_text(self.config_text())
        log = open(self.workdir / "coordinator.log", "ab")  # noqa: SIM115
        try:
            self.coordinator = self.lab.popen("n1", [
                sys.executable, "-m", "pool.cli", "--store", str(self.store_root), "serve",
                "--socket", str(self.socket), "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**self.env, "POOL_RUN_DIR": str(self.workdir / "run-coordinator")})
        finally:
            log.close()
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.coordinator.poll() is not None:
                raise RuntimeError("pool serve exited:\n" + self.log("coordinator")[-3000:])
            try:
                with self.client() as c:
                    c.ping()
                return
            except Exception:  # noqa: BLE001  not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def wait_nodes_up(self, *hosts: str, timeout: float = 60) -> dict:
        return self.wait_nodes(lambda rows: all(rows[h]["healthy"] for h in hosts),
                               timeout, f"nodes {hosts} up")

    def wait_nodes(self, cond, timeout: float = 30, what: str = "nodes") -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                rows = {r["name"]: r for r in c.nodes()}
                if cond(rows):
                    return rows
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: {rows}\n" + self.log("coordinator")[-2000:])
                time.sleep(0.1)

    def client(self):
        from pool.client import Client

        return Client(self.socket, timeout=5)

    def log(self, who: str) -> str:
        p = self.workdir / f"{who}.log" if who == "coordinator" else self.workdir / f"agent-{who}.log"
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
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
            try:
                self.coordinator.wait(30)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait()
        for h in list(self.agents):
            try:
                self.stop_agent(h)
            except subprocess.TimeoutExpired:
                self.kill_agent(h)
        self.reap_orphans()

    def __enter__(self) -> "PoolLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
