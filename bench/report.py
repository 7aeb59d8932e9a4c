"""Turn a pytest-benchmark JSON file into a Markdown report: bench/results/NAME.md next to NAME.json.

    python bench/report.py bench/results/latest.json [--allow-dirty]

Refuses results recorded on a dirty tree (machine_info.git, written by bench/conftest.py) unless
--allow-dirty is given, which stamps the report "from a dirty tree".

Sections: time to first correct answer per mode (kind "first-answer": median, quartiles, min-max, and
x vs cold = cold median / this median, both to the same end point in the same interleaved run), the
client round trip (kind "client-round-trip"), running instances (wake on request against cold
start, live checkpoint freeze, migration), the soak, the heavy templates' image sizes, memory per
copy, throughput and page-cache effect, and a plain table for every other benchmark. With heavy-template
results also NAME-summary.json and PNG charts NAME-latency.png, NAME-memory.png, NAME-throughput.png
(matplotlib; skipped with a note when it is not installed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: interleave.py is beside it
from interleave import ANSWER, nearest_rank, spread  # noqa: E402

MODES = ("cold", "criu-cli", "spawn-miss", "spawn-warm", "peer", "lazy")
MODE_LABEL = {"cold": "cold start", "criu-cli": "criu restore (CLI)", "spawn-miss": "spawn, restore on miss",
              "spawn-warm": "spawn, warm pool", "peer": "runtime's own aid",
              "lazy": "criu restore, lazy pages (not in the pool)"}
TARGET = {"spawn-warm": 100, "spawn-miss": 10}  # the goals: this many times faster than cold
OWN_SECTIONS = ("first-answer", "client-round-trip", "demand-round-trip", "demand-burst",
                "wake-first-answer", "live-checkpoint", "migrate")
WAKE_MODES = {"wake": "wake on request (suspended instance)", "spawn-miss": "spawn, restore on miss",
              "cold": "cold start"}
MB = 2 ** 20


class DirtyTree(Exception):
    pass


def provenance(data: dict, allow_dirty: bool) -> str:
    """The report's stamp: the commit, and whether the tree was clean. DirtyTree when it was not (or
    nothing says) and allow_dirty is not set."""
    git = data.get("machine_info", {}).get("git")
    if not git:
        if not allow_dirty:
            raise DirtyTree("these results record no git commit (machine_info.git): rerun the benchmarks "
                            "with bench/conftest.py, or pass --allow-dirty")
        return "**From an unknown tree** (no commit recorded): not for the README."
    if git["clean"]:
        return f"Commit `{git['commit']}`, clean tree."
    if not allow_dirty:
        changes = "\n  ".join(git.get("changes") or ["(the commit changed during the run)"])
        raise DirtyTree(f"these results come from a dirty tree (commit {git['commit']} plus uncommitted "
                        f"changes):\n  {changes}\ncommit, rerun, or pass --allow-dirty")
    return (f"**From a dirty tree** (commit `{git['commit']}` plus uncommitted changes): "
            "not for the README.")


def _heavy(b: dict) -> bool:
    return bool(b.get("extra_info", {}).get("heavy"))


def _soak(b: dict) -> bool:
    return "growth" in b.get("extra_info", {})


def _kind(b: dict) -> str | None:
    return b.get("extra_info", {}).get("kind")


def soak_markdown(data: dict) -> str:
    """The soak benchmark (bench/test_soak_bench.py): throughput, latency, errors and growth."""
    rows = ["| concurrency | cycles | errors | spawns/s | p50 ms | p99 ms | paths | "
            "fds before -> after | RSS MB | children | run-dir entries |",
            "|---:|---:|---|---:|---:|---:|---|---|---|---|---|"]
    for b in data.get("benchmarks", []):
        if not _soak(b):
            continue
        x = b["extra_info"]
        bf, af = x["before"], x["after"]
        pair = lambda k: f"{bf[k]} -> {af[k]}"  # noqa: E731
        rows.append(f"| {x['concurrency']} | {x['cycles']} | {x['errors'] or 0} | "
                    f"{x['spawns_per_s']} | {x['p50_ms']} | {x['p99_ms']} | "
                    f"{', '.join(f'{k} {v}' for k, v in sorted(x['paths'].items()))} | "
                    f"{pair('fds')} | {pair('rss_mb')} | {pair('children')} | "
                    f"{pair('run_dir_entries')} |")
    return "## Soak: spawn + kill cycles through the service\n\n" + "\n".join(rows) + "\n"


def head(data: dict, stamp: str) -> str:
    m = data.get("machine_info", {})
    return (f"# Benchmarks\n\n{data.get('datetime', '')}, {m.get('node', '')}, "
            f"{m.get('cpu', {}).get('brand_raw', '')}, Python {m.get('python_version', '')}\n\n{stamp}\n")


def table(data: dict) -> str:
    """Every benchmark without a section of its own: pytest-benchmark's timing of its target."""
    benches = [b for b in data.get("benchmarks", [])
               if not _heavy(b) and not _soak(b) and _kind(b) not in OWN_SECTIONS]
    if not benches:
        return ""
    rows = ["## Other benchmarks\n", "| benchmark | rounds | min ms | median ms | mean ms | max ms |",
            "|---|---:|---:|---:|---:|---:|"]
    for b in benches:
        s = b["stats"]
        rows.append(f"| {b['name']} | {s['rounds']} | {s['min'] * 1e3:.3f} | {s['median'] * 1e3:.3f} | "
                    f"{s['mean'] * 1e3:.3f} | {s['max'] * 1e3:.3f} |")
    return "\n".join(rows) + "\n"


# --- time to first correct answer ------------------------------------------------------------------
def first_answer_summary(data: dict) -> dict:
    """{template: {mode: {"answer_s": spread, other measures: spread, "x_vs_cold": ..., peer info}}}.
    x_vs_cold divides the cold median by this mode's median, both of answer_s from the same run."""
    out: dict = {}
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("kind") != "first-answer":
            continue
        modes = {}
        for mode, measures in x["modes"].items():
            modes[mode] = {key: spread(vals) for key, vals in measures.items() if vals}
        cold = modes.get("cold", {}).get(ANSWER, {}).get("median")
        for mode, m in modes.items():
            med = m[ANSWER]["median"]
            m["x_vs_cold"] = round(cold / med, 1) if cold and med and mode != "cold" else None
            if x.get("heavy") and mode in TARGET and m["x_vs_cold"] is not None:  # goals: heavy apps
                m["target_x"], m["target_met"] = TARGET[mode], m["x_vs_cold"] >= TARGET[mode]
        if "peer" in modes:
            modes["peer"].update({k: x[k] for k in ("peer", "archive_bytes", "peer_first_start_s",
                                                     "torch_threads") if k in x})
        out[x["template"]] = {"latency": modes, "heavy": bool(x.get("heavy")), "cycles": x["cycles"],
                              "warmup_cycles": x["warmup_cycles"], "order": x["order"]}
    return out


def first_answer_markdown(fa: dict) -> str:
    lines = ["## Time to first correct answer", "",
             ("Every mode measured to the same end point (the first correct answer from the app), "
              "interleaved round-robin in one run: n kept cycles after the discarded warm-up cycles. "
              "x vs cold = cold median / this median. The spawn call alone (client) and the service's "
              "own spawn_ms are the same spawns' share of it."), "",
             "| template | path | n | median ms | p25-p75 ms | min-max ms | x vs cold | goal | "
             "spawn call median ms | service spawn_ms median |",
             "|---|---|---:|---:|---|---|---:|---|---:|---:|"]
    for name, t in fa.items():
        for mode in MODES:
            m = t["latency"].get(mode)
            if not m:
                continue
            a = m[ANSWER]
            goal = (f">= {m['target_x']}x: {'met' if m['target_met'] else 'missed'}"
                    if "target_x" in m else "")
            label = MODE_LABEL[mode] + (f" ({m['peer']})" if m.get("peer") else "")
            call = _ms(m["spawn_call_s"]["median"]) if "spawn_call_s" in m else ""
            svc = f"{m['service_spawn_ms']['median']:.2f}" if "service_spawn_ms" in m else ""
            x = "" if m["x_vs_cold"] is None else f"{m['x_vs_cold']}x"
            lines.append(f"| {name} | {label} | {a['n']} | {_ms(a['median'])} | {_ms(a['p25'])}-"
                         f"{_ms(a['p75'])} | {_ms(a['min'])}-{_ms(a['max'])} | {x} | {goal} | {call} | {svc} |")
    peers = [(n, t["latency"]["peer"]) for n, t in fa.items() if "peer" in t["latency"]]
    notes = [f"- {n}: {p.get('peer', '')}" + (f", archive {p['archive_bytes'] / MB:.1f} MB"
                                              if "archive_bytes" in p else "")
             + (f", torch threads {p['torch_threads']} (as the copies)" if "torch_threads" in p else "")
             + (f", its own first start {p['peer_first_start_s']} s (not in the samples)"
                if "peer_first_start_s" in p else "") for n, p in peers]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def client_round_trip_markdown(data: dict) -> str:
    rows = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("kind") != "client-round-trip":
            continue
        call = [v * 1e3 for v in x["spawn_call_s"]]
        svc = x["service_spawn_ms"]
        outside = [c - s for c, s in zip(call, svc)]
        ping = [v * 1e3 for v in x["ping_s"]]
        for what, vals in (("warm spawn at the client (request written to reply parsed)", call),
                           ("the same spawns, service's own spawn_ms", svc),
                           ("the difference: socket, framing, JSON, client", outside),
                           ("bare ping round trip", ping)):
            s = spread(vals)
            rows.append(f"| {x['template']} | {what} | {s['n']} | {s['median']:.2f} | "
                        f"{nearest_rank(vals, 99):.2f} | {s['min']:.2f}-{s['max']:.2f} |")
    if not rows:
        return ""
    return ("## Client round trip (pool.Client over the unix socket)\n\n"
            "Each spawn from two idle warm copies, nothing restoring; p99 nearest rank.\n\n"
            "| template | what | n | median ms | p99 ms | min-max ms |\n|---|---|---:|---:|---:|---|\n"
            + "\n".join(rows) + "\n")


def demand_markdown(data: dict) -> str:
    """bench/test_demand_bench.py: the warm round trip, and bursts from an idle pool per config."""
    rows, bursts = [], []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("kind") == "demand-round-trip":
            call = [v * 1e3 for v in x["spawn_call_s"]]
            s = spread(call)
            rows.append(f"Warm spawn at the client: p50 {s['median']:.3f} ms, p99 "
                        f"{nearest_rank(call, 99):.3f} ms (n {s['n']}; the service's own spawn_ms "
                        f"p50 {spread(x['service_spawn_ms'])['median']:.3f} ms).\n")
        elif x.get("kind") == "demand-burst":
            bursts.append(f"| {x['config']} | {x.get('template', 'py-hello')} | {x['spawns']} | {x['concurrency']} | {x['copies_per_s']} | "
                          f"{x['p50_ms']} | {x['p99_ms']} | {x['hits']} | {x['misses']} | "
                          f"{x['peak_target']} | {x['target_after']} |")
    if not rows and not bursts:
        return ""
    text = "## Warm pools that follow demand (pool serve)\n\n" + "".join(rows)
    if bursts:
        text += ("\nBursts from an idle pool, spawn -> kill per worker:\n\n"
                 "| pool | template | spawns | concurrency | copies/s | p50 ms | p99 ms | hits | misses | "
                 "peak target | target after |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                 + "\n".join(bursts) + "\n")
    return text


# --- running instances: wake, live checkpoint, migration ------------------------------------------
def _spread_ms(vals: list[float]) -> tuple[int, str, str, str]:
    """(n, median, p25-p75, min-max) of values already in ms."""
    s = spread(vals)
    f = lambda v: f"{v:.0f}" if v >= 100 else f"{v:.1f}"  # noqa: E731
    return s["n"], f(s["median"]), f"{f(s['p25'])}-{f(s['p75'])}", f"{f(s['min'])}-{f(s['max'])}"


def live_markdown(data: dict) -> str:
    """bench/test_live_bench.py: wake on request against cold start (kind "wake-first-answer", the
    same interleaved samples as the first-answer section), live checkpoints and migrations."""
    wake, ckpt, moves, pre_dumps = [], [], [], {}
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("kind") == "wake-first-answer":
            modes = {m: spread(v[ANSWER]) for m, v in x["modes"].items() if v.get(ANSWER)}
            cold = modes.get("cold", {}).get("median")
            for mode, label in WAKE_MODES.items():
                a = modes.get(mode)
                if not a:
                    continue
                xc = f"{cold / a['median']:.1f}x" if cold and a["median"] and mode != "cold" else ""
                sus = x["modes"][mode].get("suspend_call_ms")
                wake.append(f"| {x['template']} | {label} | {a['n']} | {_ms(a['median'])} | "
                            f"{_ms(a['p25'])}-{_ms(a['p75'])} | {_ms(a['min'])}-{_ms(a['max'])} | {xc} | "
                            f"{_spread_ms(sus)[1] if sus else ''} |")
        elif x.get("kind") == "live-checkpoint":
            n, fmed, fq, fr = _spread_ms(x["freeze_ms"])
            _, cmed, cq, _ = _spread_ms(x["call_ms"])
            ckpt.append(f"| {x['template']} | {n} | {fmed} | {fq} | {fr} | {_spread_ms(x['dump_ms'])[1]} | "
                        f"{cmed} | {cq} | {statistics.median(x['snapshot_bytes']) / MB:.0f} | "
                        f"{', '.join(p.split(':')[0] for p in x['pre_dump'])} |")
            pre_dumps.update(dict.fromkeys(x["pre_dump"]))
        elif x.get("kind") == "migrate":
            n, cmed, cq, cr = _spread_ms(x["call_ms"])
            freeze = [v for v in x["freeze_ms"] if v is not None]
            moves.append(f"| {x['template']} | {'lazy' if x['lazy'] else 'eager'} | {n} | {cmed} | {cq} | "
                         f"{cr} | {_spread_ms(x['migrate_ms'])[1]} | "
                         f"{_spread_ms(freeze)[1] if freeze else '- (lazy)'} | "
                         f"{_spread_ms(x['first_answer_after_ms'])[1]} | "
                         f"{statistics.median(x['image_bytes']) / MB:.1f} |")
    if not (wake or ckpt or moves):
        return ""
    text = "## Running instances: wake on request, live checkpoint, migration\n"
    if wake:
        text += ("\nA suspended instance, from the connect to its address to its first correct answer "
                 "(the service restores it in between), interleaved round-robin with the template's "
                 "cold start and a restoring spawn to the same answer. x vs cold = cold median / this "
                 "median. The suspend call before each wake is not in it.\n\n"
                 "| template | path | n | median ms | p25-p75 ms | min-max ms | x vs cold | "
                 "suspend call median ms |\n|---|---|---:|---:|---|---|---:|---:|\n" + "\n".join(wake) + "\n")
    if ckpt:
        text += ("\n`pool checkpoint` of a running instance: freeze = the time the app stood frozen "
                 "(CRIU's own measure), dump = the whole dump in the service, call = the RPC at the "
                 "client.\n\n| template | n | freeze median ms | freeze p25-p75 ms | freeze min-max ms | "
                 "dump median ms | call median ms | call p25-p75 ms | snapshot MB | pre-dump |\n"
                 "|---|---:|---:|---|---|---:|---:|---|---:|---|\n" + "\n".join(ckpt) + "\n\n"
                 + "".join(f"- pre-dump: {p}\n" for p in pre_dumps))
    if moves:
        text += ("\n`pool migrate` between two agents in network namespaces (mutual TLS), back and "
                 "forth: the call at the client, the coordinator's migrate_ms, the app's freeze (eager "
                 "only), and the first answer on the new node after the call (lazy: its memory still "
                 "following).\n\n| template | mode | n | call median ms | call p25-p75 ms | call min-max ms | "
                 "migrate_ms median | freeze median ms | first answer after, median ms | shipped MB |\n"
                 "|---|---|---:|---:|---|---|---:|---:|---:|---:|\n" + "\n".join(moves) + "\n")
    return text


# --- issue #11's goals -------------------------------------------------------------------------------
def goals_markdown(data: dict) -> str:
    """The goals of fast misses and shared memory (fork, demand-sized pools, lazy restore), each with
    the figure this run measured: from bench/test_demand_bench.py, test_fork_bench.py and
    test_lazy_bench.py when they ran in it. A goal whose benchmark did not run says so."""
    by_kind: dict[str, list[dict]] = {}
    named: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        by_kind.setdefault(x.get("kind", ""), []).append(x)
        named[b["name"]] = x
    rows: list[tuple[str, str, str, bool | None]] = []  # measure, goal, measured, met

    def row(measure: str, goal: str, value: float | None, fmt: str, met) -> None:
        rows.append((measure, goal, "not in this run" if value is None else fmt.format(value),
                     None if value is None else met(value)))

    rtt = by_kind.get("demand-round-trip", [])
    row("warm spawn, client round trip p50", "<= 0.5 ms",
        statistics.median(rtt[0]["spawn_call_s"]) * 1e3 if rtt else None, "{:.2f} ms", lambda v: v <= 0.5)
    fork_miss = named.get("test_fork_miss", {}).get("spawn_call_p50_ms", {}).get("fork-miss")
    row("py-hello miss (fork), client round trip p50", "<= 10 ms", fork_miss, "{:.1f} ms",
        lambda v: v <= 10)
    embed = (by_kind.get("fork-embed") or [None])[0]
    row("py-embed miss (fork) to first answer p50", "<= 30 ms",
        embed["answer_p50_ms"] if embed else None, "{:.1f} ms", lambda v: v <= 30)
    row("PSS per forked copy / template RSS, py-embed", "<= 25 %",
        embed["pss_per_copy_over_template_rss"] * 100 if embed else None, "{:.0f} %", lambda v: v <= 25)
    fork_burst = next((x for x in by_kind.get("demand-burst", []) if x.get("config") == "fork"), None)
    row("py-hello copies per second, concurrency 8 (fork mode)", ">= 150/s",
        fork_burst["copies_per_s"] if fork_burst else None, "{:.0f}/s", lambda v: v >= 150)
    row(f"burst of {fork_burst['spawns'] if fork_burst else 400} spawns at concurrency 8 from an idle "
        "pool, p99 (fork mode)", "<= 50 ms", fork_burst["p99_ms"] if fork_burst else None,
        "{:.0f} ms", lambda v: v <= 50)
    for base in ("jvm-app", "node-app"):
        ratio = named.get(f"test_lazy_vs_full_miss[{base}]", {}).get("lazy_over_full")
        row(f"{base} miss to first answer, lazy / full restore", "<= 0.6x", ratio, "{:.2f}x",
            lambda v: v <= 0.6)
    row("live py-embed copies that fit in 20 GiB (fork mode)", ">= 200",
        embed["copies_in_20_gib"] if embed else None, "{:,.0f}", lambda v: v >= 200)
    if all(r[3] is None for r in rows):
        return ""
    mark = {True: "met", False: "**not met**", None: ""}
    return ("## Goals: misses in milliseconds, memory shared (fork, demand-sized pools, lazy)\n\n"
            "| measure | goal | this run | |\n|---|---|---:|---|\n"
            + "\n".join(f"| {m} | {g} | {v} | {mark[ok]} |" for m, g, v, ok in rows) + "\n")


# --- heavy templates ---------------------------------------------------------------------------------
def heavy_summary(data: dict, fa: dict) -> dict:
    """{template: {"latency": {mode: {...}} (from first_answer_summary), "image": {...},
    "memory": {n: {...}}, "throughput": {c: copies/s}, "page_cache": {...}}}."""
    out: dict = defaultdict(lambda: {"latency": {}, "memory": {}, "throughput": {}})
    for name, t in fa.items():
        if t["heavy"]:
            out[name].update(t)
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if not x.get("heavy") or x.get("kind") == "first-answer":
            continue
        t = out[x["template"]]
        kind = x["kind"]
        if kind == "image":
            t["image"] = {k: x[k] for k in x if k not in ("heavy", "template", "kind")}
        elif kind == "memory":
            t["memory"][str(x["copies"])] = {k: x[k] for k in ("rss_per_copy_bytes",
                                                                "pss_per_copy_bytes", "pss_total_bytes")}
        elif kind == "throughput":
            t["throughput"][str(x["concurrency"])] = x["copies_per_second"]
        elif kind == "page-cache":
            t["page_cache"] = {k: x[k] for k in x if k not in ("heavy", "template", "kind")}
    return {k: out[k] for k in sorted(out)}


def _ms(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.1f}")


def heavy_markdown(summary: dict) -> str:
    lines = ["## Heavy templates: image, memory, throughput, page cache", "",
              "| template | image MB | compressed MB | method | dump s | boot to ready at build s |",
              "|---|---:|---:|---|---:|---:|"]
    for name, t in summary.items():
        im = t.get("image")
        if im:
            lines.append(f"| {name} | {im['image_bytes'] / MB:.0f} | {im['compressed_bytes'] / MB:.0f} | "
                         f"{im['compression']} | {im.get('dump_s')} | {im.get('build_boot_to_ready_s')} |")
    lines += ["", "| template | copies alive | RSS per copy MB | PSS per copy MB | PSS all copies MB |",
              "|---|---:|---:|---:|---:|"]
    for name, t in summary.items():
        for n, m in sorted(t["memory"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {name} | {n} | {m['rss_per_copy_bytes'] / MB:.0f} | "
                         f"{m['pss_per_copy_bytes'] / MB:.0f} | {m['pss_total_bytes'] / MB:.0f} |")
    conc = sorted({int(c) for t in summary.values() for c in t["throughput"]})
    if conc:
        lines += ["", "Restores to a correct answer per second, by restores at once:", "",
                  "| template | " + " | ".join(f"c={c}" for c in conc) + " |",
                  "|---|" + "---:|" * len(conc)]
        for name, t in summary.items():
            lines.append(f"| {name} | " + " | ".join(f"{t['throughput'].get(str(c), '-')}"
                                                    for c in conc) + " |")
    lines += ["", "| template | restore to answer, page cache warm, p50 ms | after drop_caches, p50 ms |",
              "|---|---:|---:|"]
    for name, t in summary.items():
        pc = t.get("page_cache")
        if pc:
            lines.append(f"| {name} | {_ms(pc['warm_cache_p50_s'])} | {_ms(pc['dropped_cache_p50_s'])} |")
    return "\n".join(lines) + "\n"


def heavy_charts(summary: dict, stem: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("report: matplotlib is not installed: no charts (scripts/setup-heavy.sh installs it)",
              file=sys.stderr)
        return []
    names = list(summary)
    written = []

    # latency: median bars per template and mode, whiskers p25 to p75, log scale
    fig, ax = plt.subplots(figsize=(9, 5.2))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        xs, med, down, up = [], [], [], []
        for j, name in enumerate(names):
            lat = summary[name]["latency"].get(mode)
            if lat:
                a = lat[ANSWER]
                xs.append(j + (i - (len(MODES) - 1) / 2) * width)
                med.append(a["median"] * 1e3)
                down.append((a["median"] - a["p25"]) * 1e3)
                up.append((a["p75"] - a["median"]) * 1e3)
        if xs:
            ax.bar(xs, med, width, yerr=[down, up], capsize=2, label=MODE_LABEL[mode])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("time to first correct answer, ms (median, whiskers p25-p75)")
    if ax.get_legend_handles_labels()[0]:  # below the plot: the tall cold bars leave no room inside
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    written.append(stem.with_name(stem.name + "-latency.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # memory: PSS per copy by copies alive
    fig, ax = plt.subplots(figsize=(7, 4))
    counts = sorted({int(n) for t in summary.values() for n in t["memory"]})
    width = 0.8 / max(1, len(counts))
    for i, n in enumerate(counts):
        vals = [summary[name]["memory"].get(str(n), {}).get("pss_per_copy_bytes", 0) / MB for name in names]
        ax.bar([j + (i - (len(counts) - 1) / 2) * width for j in range(len(names))], vals, width,
               label=f"{n} {'copy' if n == 1 else 'copies'} alive")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("PSS per restored copy, MB")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(stem.with_name(stem.name + "-memory.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # throughput: copies per second by concurrency
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        tp = sorted((int(c), v) for c, v in summary[name]["throughput"].items())
        if tp:
            ax.plot([c for c, _ in tp], [v for _, v in tp], marker="o", label=name)
    ax.set_xlabel("restores at once")
    ax.set_ylabel("copies restored to a correct answer per second")
    ax.set_xscale("log", base=2)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(stem.with_name(stem.name + "-throughput.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> Markdown report")
    parser.add_argument("results", type=Path)
    parser.add_argument("--allow-dirty", action="store_true",
                        help="report results from a dirty tree anyway, stamped as such")
    args = parser.parse_args(argv[1:])
    src = args.results
    data = json.loads(src.read_text())
    try:
        stamp = provenance(data, args.allow_dirty)
    except DirtyTree as e:
        print(f"report.py: refused: {e}", file=sys.stderr)
        return 3
    out = src.with_suffix(".md")
    fa = first_answer_summary(data)
    text = head(data, stamp)
    if fa:
        text += "\n" + first_answer_markdown(fa)
    rtt = client_round_trip_markdown(data)
    if rtt:
        text += "\n" + rtt
    goals = goals_markdown(data)
    if goals:
        text += "\n" + goals
    demand = demand_markdown(data)
    if demand:
        text += "\n" + demand
    live = live_markdown(data)
    if live:
        text += "\n" + live
    if any(_soak(b) for b in data.get("benchmarks", [])):
        text += "\n" + soak_markdown(data)
    summary = heavy_summary(data, fa)
    if summary:
        stem = src.with_suffix("")
        stem.with_name(stem.name + "-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        charts = heavy_charts(summary, stem)
        text += "\n" + heavy_markdown(summary)
        text += "".join(f"\n![{p.stem}]({p.name})\n" for p in charts)
    other = table(data)
    if other:
        text += "\n" + other
    out.write_text(text)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
