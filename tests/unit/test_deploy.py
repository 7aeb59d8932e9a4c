"""deploy/: the systemd units pass `systemd-analyze verify`, both sets use only flags `pool` has, and
the Kubernetes manifests are schema-valid (the kubernetes client's models forbid unknown fields and
require the required ones) and consistent (every name they reference exists in the set; the etcd
members' URLs are the endpoints the coordinator and the agents are configured with, and its flags
exist in the etcd the integration tests run).

`kubectl apply/create --dry-run=client` cannot check them here: without a cluster it fails at API
discovery ("unable to recognize"), --validate=false included.
"""
from __future__ import annotations

import configparser
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml
from etcdlab import ETCD

from pool.cli.doctor import LAZY_PIPE_SIZE
from pool.cluster.config import ServiceConfig, load_config
from pool.errors import SpecError
from pool.node.runtime import DRAIN_SLACK_S
from pool.wire.rpc import systemd_listen_socket

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
KUBE = ROOT / "deploy" / "kubernetes"
UNITS = ("pool.socket", "pool.service", "pool-agent.service")
INSTALLED_POOL = "/usr/local/bin/pool"     # what the units' ExecStart names (docs/deploy.md)
POOL = Path(sys.executable).parent / "pool"
# sandboxing that breaks CRIU or the copies (pool.service says why)
FORBIDDEN = ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "ReadOnlyPaths",
             "ProtectKernelTunables", "ProtectControlGroups", "ProtectProc", "PrivateDevices",
             "PrivateMounts", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectKernelModules",
             "ProtectClock", "SystemCallFilter", "RestrictNamespaces", "RestrictAddressFamilies",
             "MemoryDenyWriteExecute", "LockPersonality", "ProtectHostname", "NoNewPrivileges",
             "DynamicUser", "User")


# -- systemd ------------------------------------------------------------------------------------------
def unit(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(interpolation=None, strict=True)
    p.optionxform = str  # systemd keys are case-sensitive
    p.read_string((SYSTEMD / name).read_text())
    return p


def checked_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this venv's `pool` (verify needs it to exist)."""
    out = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        dst = tmp_path / name
        dst.write_text(text.replace(INSTALLED_POOL, str(POOL)))
        out.append(dst)
    return out


def verify(paths: list[Path]) -> list[str]:
    r = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                       timeout=60)
    # only what concerns our units (a machine's own broken units are not ours to judge)
    complaints = [ln for ln in r.stderr.splitlines()
                  if any(p.name in ln or str(p.parent) in ln for p in paths)]
    return complaints if r.returncode == 0 else [f"exit {r.returncode}", *complaints]


def test_units_pass_systemd_analyze_verify(tmp_path):
    assert POOL.exists()
    assert verify(checked_copies(tmp_path)) == []


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key and a missing binary are reported."""
    paths = checked_copies(tmp_path)
    svc = tmp_path / "pool.service"
    svc.write_text(svc.read_text().replace("KillMode=", "KillMod=").replace(str(POOL), "/nonexistent/pool"))
    complaints = "\n".join(verify(paths))
    assert "KillMod" in complaints and "/nonexistent/pool" in complaints


def test_kill_mode_lets_the_drain_run_and_leave_copies():
    for name in ("pool.service", "pool-agent.service"):
        s = unit(name)["Service"]
        assert s["KillMode"] == "process", name   # control-group or mixed kill left copies
        assert s["Restart"] == "on-failure", name
        assert s["RuntimeDirectoryPreserve"] == "yes", name  # journal of left copies, the socket
        assert s["TasksMax"] == "infinity", name
        assert not set(FORBIDDEN) & set(s), f"{name}: {set(FORBIDDEN) & set(s)}"
    assert unit("pool.service")["Service"]["RuntimeDirectory"] == "pool"


def drain_bound(cfg: ServiceConfig) -> float:
    """How long a drain may take (NodeRuntime.drain): drain_timeout + kill_grace + slack."""
    return cfg.drain_timeout + cfg.kill_grace + DRAIN_SLACK_S


def test_stop_timeout_outlasts_the_drain():
    agent_cfg = load_config(SYSTEMD / "agent.toml")
    for name, cfg in (("pool.service", ServiceConfig()), ("pool-agent.service", agent_cfg)):
        assert float(unit(name)["Service"]["TimeoutStopSec"]) > drain_bound(cfg) + 5, name


def test_socket_is_where_the_service_looks_by_default():
    sock = unit("pool.socket")["Socket"]
    assert Path(sock["ListenStream"]) == ServiceConfig().socket
    assert unit("pool.service")["Unit"]["Requires"] == "pool.socket"


def test_sysctl_raises_pipe_max_size_for_lazy_restore():
    lines = [ln.split("=") for ln in (SYSTEMD / "sysctl.d" / "60-pool.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert {k.strip(): int(v) for k, v in lines} == {"fs.pipe-max-size": LAZY_PIPE_SIZE}


# -- flags ----------------------------------------------------------------------------------------------
def flags_in(help_text: str) -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))


@functools.cache
def help_flags(command: str) -> frozenset[str]:
    r = subprocess.run([str(POOL), *command.split(), "--help"], capture_output=True, text=True, check=True,
                       timeout=60, env={**os.environ, "COLUMNS": "200"})
    return flags_in(r.stdout)


def used_flags(argv: list[str]) -> tuple[str, set[str]]:
    """argv after `pool`: the command and its --flags."""
    return argv[0], {a.split("=")[0] for a in argv[1:] if a.startswith("--")}


def test_exec_start_uses_flags_pool_has():
    for name in ("pool.service", "pool-agent.service"):
        argv = unit(name)["Service"]["ExecStart"].split()
        assert argv[0] == INSTALLED_POOL
        command, flags = used_flags(argv[1:])
        assert flags and flags <= help_flags(command), (name, flags - help_flags(command))


def test_help_parsing_sees_the_flags():
    assert {"--listen", "--token-file", "--run-dir", "--config"} <= help_flags("agent")
    assert {"--config", "--source", "--socket"} <= help_flags("serve")


# -- Kubernetes ---------------------------------------------------------------------------------------
def manifests() -> list[dict]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


def model(doc: dict):
    """The kubernetes client's model of doc's kind (apiVersion v1 or apps/v1)."""
    version = doc["apiVersion"].split("/")[-1]
    return getattr(k8s, f"{version.capitalize()}{doc['kind']}")


def test_manifests_are_schema_valid():
    docs = manifests()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Deployment",
                                         "StatefulSet", "PersistentVolumeClaim", "Service"}
    for d in docs:
        model(d).model_validate(d)  # unknown fields, wrong types, missing required fields: an error


def test_schema_check_can_fail():
    ds = by_kind("DaemonSet")[0]
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    with pytest.raises(ValueError, match="privilegd"):
        model(ds).model_validate(ds)
    ds = by_kind("DaemonSet")[0]
    del ds["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        model(ds).model_validate(ds)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in KUBE.glob("*.yaml")
                                            if p.name != "kustomization.yaml")


def workloads() -> list[dict]:
    return by_kind("DaemonSet") + by_kind("Deployment") + by_kind("StatefulSet")


POOL_WORKLOADS = ("pool-agent", "pool-coordinator")   # containers running `pool`
ETCD_WORKLOAD = "etcd"                                 # etcd's own image and flags


def pool_workloads() -> list[dict]:
    return [w for w in workloads() if w["metadata"]["name"] in POOL_WORKLOADS]


def test_every_workload_is_pool_or_etcd():
    assert sorted(w["metadata"]["name"] for w in workloads()) == sorted([*POOL_WORKLOADS,
                                                                         ETCD_WORKLOAD])


def test_every_referenced_name_exists():
    names = {kind: {d["metadata"]["name"] for d in by_kind(kind)}
             for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    namespaces = {d["metadata"]["name"] for d in by_kind("Namespace")}
    for d in manifests():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] in namespaces, d["metadata"]["name"]
    for w in workloads():
        pod = w["spec"]["template"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in names["ConfigMap"]
            if "secret" in v:
                assert v["secret"]["secretName"] in names["Secret"]
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in names["PersistentVolumeClaim"]
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            assert {m["name"] for m in c["volumeMounts"]} <= volumes.keys() | claims, c["name"]
    for svc in by_kind("Service"):
        pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pods)


def mounted_files(w: dict) -> dict[str, str]:
    """path -> the content the pod sees there, for files from the set's ConfigMaps and Secrets."""
    pod = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = {("configMap", d["metadata"]["name"]): d["data"] for d in by_kind("ConfigMap")}
    sources |= {("secret", d["metadata"]["name"]): d["stringData"] for d in by_kind("Secret")}
    files = {}
    for c in pod["containers"]:
        for m in c["volumeMounts"]:
            v = volumes[m["name"]]
            for kind, key in (("configMap", "name"), ("secret", "secretName")):
                if kind in v:
                    for fname, text in sources[(kind, v[kind][key])].items():
                        files[f"{m['mountPath']}/{fname}"] = text
    return files


def test_containers_use_flags_pool_has_and_files_they_mount(tmp_path):
    """Every `pool` command line (container, probe) uses existing flags; every file it names
    (--config, --token-file, token_file in the config) comes from the set; the config parses and its
    drain fits in terminationGracePeriodSeconds."""
    for w in pool_workloads():
        files = mounted_files(w)
        pod = w["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []):   # e.g. the agents' certificate, issued at start
            assert c["command"][0] == "pool" and c["image"].startswith("prewarm-pool:"), c["name"]
            command = " ".join(c["command"][1:])      # the verb: `certs issue`
            flags = {a.split("=")[0] for a in c["args"] if a.startswith("--")}
            assert flags and flags <= help_flags(command), (c["name"], flags - help_flags(command))
        for c in pod["containers"]:
            argv = c["command"] + c["args"]
            assert argv[0] == "pool" and c["image"].startswith("prewarm-pool:"), c["name"]
            command, flags = used_flags(argv[1:])
            assert flags <= help_flags(command), (c["name"], flags - help_flags(command))
            probe = c.get("readinessProbe", {}).get("exec", {}).get("command")
            if probe:
                pcommand, pflags = used_flags(probe[1:])
                assert probe[0] == "pool" and pflags <= help_flags(pcommand)
            for flag in ("--config", "--token-file"):
                if flag in argv:
                    assert argv[argv.index(flag) + 1] in files, (c["name"], flag)
            conf = tmp_path / f"{w['metadata']['name']}.toml"
            conf.write_text(files[argv[argv.index("--config") + 1]])
            cfg = load_config(conf)
            for node in cfg.nodes.values():
                assert str(node.token_file) in files, node.name
            if cfg.token_file:
                assert str(cfg.token_file) in files
            if cfg.etcd is not None and cfg.etcd.agent_token_file is not None:
                assert str(cfg.etcd.agent_token_file) in files
            # every TCP link is TLS: without it `pool` refuses to start (no insecure flag here)
            assert cfg.tls_dir is not None and not cfg.insecure_plain_tcp, c["name"]
            assert str(cfg.tls_dir) in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]
            assert pod["terminationGracePeriodSeconds"] > drain_bound(cfg) + 5


def test_agents_get_what_criu_needs():
    pod = by_kind("DaemonSet")[0]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is False
    assert pod["containers"][0]["securityContext"]["privileged"] is True
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/var/lib/pool/cache", "/run/pool-agent"}
    run = next(v for v in pod["volumes"] if v["name"] == "run")
    assert run["emptyDir"]["medium"] == "Memory"  # /run a tmpfs: CRIU caches its kernel probes


# -- etcd ------------------------------------------------------------------------------------------
@functools.cache
def etcd_help_flags() -> frozenset[str]:
    r = subprocess.run([ETCD, "--help"], capture_output=True, text=True, check=True, timeout=60)
    return flags_in(r.stdout)


def etcd_args(c: dict) -> dict[str, str]:
    """--flag=value args into {flag: value}; every arg must be of that form."""
    out = {}
    for a in c["args"]:
        flag, sep, value = a.partition("=")
        assert a.startswith("--") and sep, f"{a!r}: not --flag=value"
        out[flag] = value
    return out


def configured_endpoints(configs: dict[str, str], tmp_path: Path) -> dict[str, set[str]]:
    """The [etcd] endpoints of each config file (pool-config: service.toml, agent.toml)."""
    out = {}
    for fname, text in configs.items():
        conf = tmp_path / fname
        conf.write_text(text)
        cfg = load_config(conf)
        assert cfg.etcd is not None, fname
        out[fname] = {e.url for e in cfg.etcd.endpoints}
    return out


def etcd_set() -> tuple[dict, dict, dict[str, str]]:
    """(etcd's StatefulSet, its Service, pool-config's files)."""
    sts = next(w for w in workloads() if w["metadata"]["name"] == ETCD_WORKLOAD)
    svc = next(s for s in by_kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"])
    return sts, svc, by_kind("ConfigMap")[0]["data"]


def check_etcd(sts: dict, svc: dict, configs: dict[str, str], tmp_path: Path) -> None:
    """etcd's flags exist (checked against the etcd the integration tests run); each member
    advertises its stable name in the headless Service as client and peer URL; the initial cluster
    names every member; and the coordinator's and the agents' endpoints are exactly the members'
    client URLs."""
    ns = sts["metadata"]["namespace"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    replicas = sts["spec"]["replicas"]
    assert replicas in (1, 3, 5)                                 # an odd quorum
    [c] = sts["spec"]["template"]["spec"]["containers"]
    image, _, tag = c["image"].rpartition(":")
    assert image and re.fullmatch(r"v3\.[4-9]\.\d+", tag), c["image"]   # pinned, 3.4+
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == ports
    args = etcd_args(c)
    assert args.keys() <= etcd_help_flags(), args.keys() - etcd_help_flags()
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env["POD_NAME"] == "metadata.name" and args["--name"] == "$(POD_NAME)"
    dns = f"$(POD_NAME).{svc['metadata']['name']}.{ns}"        # the member's stable DNS name
    assert args["--advertise-client-urls"] == f"http://{dns}:{ports['client']}"
    assert args["--initial-advertise-peer-urls"] == f"http://{dns}:{ports['peer']}"
    assert args["--listen-client-urls"] == f"http://0.0.0.0:{ports['client']}"
    assert args["--listen-peer-urls"] == f"http://0.0.0.0:{ports['peer']}"
    members = [f"{sts['metadata']['name']}-{i}" for i in range(replicas)]   # StatefulSet pod names
    member_dns = [dns.replace("$(POD_NAME)", m) for m in members]
    assert args["--initial-cluster"] == ",".join(
        f"{m}=http://{d}:{ports['peer']}" for m, d in zip(members, member_dns, strict=True))
    [mount] = c["volumeMounts"]
    assert mount["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert Path(args["--data-dir"]).is_relative_to(mount["mountPath"])
    clients = {f"http://{d}:{ports['client']}" for d in member_dns}
    assert configured_endpoints(configs, tmp_path) == {"service.toml": clients, "agent.toml": clients}


def test_etcd_members_are_what_coordinator_and_agents_use(tmp_path):
    check_etcd(*etcd_set(), tmp_path)


@pytest.mark.parametrize("break_it", ["agent endpoint", "advertised url", "member count", "flag"])
def test_etcd_check_can_fail(break_it, tmp_path):
    sts, svc, configs = etcd_set()
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    if break_it == "agent endpoint":     # the agents pointed at a Service that does not exist
        configs["agent.toml"] = configs["agent.toml"].replace("etcd-2.etcd.", "etcd-2.etcd-peers.")
    elif break_it == "advertised url":
        args[:] = [a.replace(".prewarm-pool:2379", ".default:2379") for a in args]
    elif break_it == "member count":     # a member the initial cluster and the configs do not name
        sts["spec"]["replicas"] += 2
    else:
        args.append("--advertise-client-url=http://etcd:2379")
    with pytest.raises(AssertionError):
        check_etcd(sts, svc, configs, tmp_path)


def test_etcd_flag_parsing_sees_the_flags():
    assert {"--advertise-client-urls", "--initial-cluster", "--data-dir",
            "--client-cert-auth"} <= etcd_help_flags()
    assert "--advertise-client-url" not in etcd_help_flags()


# -- socket activation: the environment ---------------------------------------------------------------
def test_listen_fds_for_another_process_is_ignored_and_removed(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "pool.socket")
    assert systemd_listen_socket() is None
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


def test_no_listen_fds_means_no_socket(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd_listen_socket() is None


def test_more_than_one_socket_is_refused(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    with pytest.raises(SpecError, match="LISTEN_FDS.*exactly one socket"):
        systemd_listen_socket()
    assert "LISTEN_FDS" not in os.environ
