#!/usr/bin/env bash
# One-stop, idempotent set-up of a fresh machine for prewarm-pool: everything `make test` needs is
# installed here, before any test runs (no test installs anything, none depends on test order):
# Debian packages, CRIU >= 4.2, a virtualenv with the package and its test tools, pycriu importable
# in it, then the heavy templates' dependencies (scripts/setup-heavy.sh).
# Quick when nothing is to do. Called by `make setup` (and so by `make test`, `make demo`, `make bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
log() { echo "setup: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "error: run as root (CRIU needs root)"; exit 1; }

# Debian packages: tini (PID 1 of every template), iproute2 (netns, veth, tc), iptables (silences
# CRIU's ip6tables-legacy-save noise), bash-completion (`pool` completes on TAB), prometheus (the
# metrics test scrapes for real), Jackson (jvm-app), etcd-server (a cluster on etcd: its tests and
# benchmark start their own).
DEBS="tini iproute2 iptables bash-completion prometheus libjackson2-databind-java etcd-server ${POOL_EXTRA_DEBS:-}"
# Tools taken from the machine when it has them, else from Debian: a bare Debian lacks venv's
# ensurepip, the JDK (java-hello, jvm-app, the Java SDK tests), node/npm (node-app) and zstd.
"$PYTHON" -c 'import ensurepip' 2>/dev/null || DEBS="$DEBS python3-venv"
for tool in java javac jar node npm zstd systemd-analyze; do
  command -v "$tool" >/dev/null || case $tool in
    systemd-analyze) DEBS="$DEBS systemd" ;;  # tests verify deploy/systemd's units
    java|javac|jar) DEBS="$DEBS openjdk-17-jdk-headless" ;;
    node|npm) DEBS="$DEBS nodejs npm" ;;
    zstd) DEBS="$DEBS zstd" ;;
  esac
done
missing=""
for p in $DEBS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || case " $missing " in
    *" $p "*) ;;
    *) missing="$missing $p" ;;
  esac
done
if [ -n "$missing" ]; then
  log "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update >/dev/null
  # shellcheck disable=SC2086
  apt-get -qq install -y --no-install-recommends $missing >/dev/null
  # Debian's prometheus package starts a system server on :9090; our tests start their own.
  if [[ " $missing " == *" prometheus "* ]]; then
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    pkill -x prometheus 2>/dev/null || true; pkill -x prometheus-node-exporter 2>/dev/null || true
  fi
  # Likewise Debian's etcd-server starts a system etcd on :2379.
  if [[ " $missing " == *" etcd-server "* ]]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

scripts/install-criu.sh

# Lazy restore (post-copy) needs CRIU to grow its pipes to 4 MiB, which root here cannot do by
# itself (no CAP_SYS_RESOURCE): raise the limit, never lower it.
want=4194304
have=$(cat /proc/sys/fs/pipe-max-size)
if [ "$have" -lt "$want" ]; then
  log "raising fs.pipe-max-size from $have to $want (lazy restore)"
  # (written directly: a bare Debian has no sysctl, which comes with procps)
  echo "$want" 2>/dev/null >/proc/sys/fs/pipe-max-size || log "warning: could not raise fs.pipe-max-size: lazy restore unavailable"
fi

# A half-made venv (python missing or broken, pip never installed, an install interrupted) is
# recreated or reinstalled: the stamp is written only after a complete, checked install.
stamp="$VENV/.pool-installed"
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  [ -e "$VENV" ] && log "$VENV is broken (no working python or pip): recreating it"
  rm -rf "$VENV"
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$VENV/bin/python" -I -c 'import pool, pytest' 2>/dev/null; then
  rm -f "$stamp"
  log "installing the package and its test tools into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  "$VENV/bin/python" -I -c 'import pool, pytest'
  touch "$stamp"
fi
# pycriu ships with CRIU (Debian's python3-pycriu), not on PyPI: expose it to the venv.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "${POOL_CRIU_PREFIX:-/opt/prewarm-pool/criu}/python" >"$site/pool-pycriu.pth"
"$VENV/bin/python" -c 'import pycriu' || { log "error: pycriu does not import in $VENV"; exit 1; }
# Tab completion of `pool` in bash (argcomplete), for every user's interactive shell.
"$VENV/bin/register-python-argcomplete" pool >/etc/bash_completion.d/pool.new
mv /etc/bash_completion.d/pool.new /etc/bash_completion.d/pool

scripts/setup-heavy.sh
