"""Turn a pytest-benchmark JSON file into a Markdown report: bench/results/NAME.md next to NAME.json.

    python bench/report.py bench/results/latest.json

Every benchmark gets a row in the spawn-latency table. The heavy-template benchmarks
(bench/test_heavy_bench.py, extra_info.heavy) get their own sections instead: time to first answer per
mode with ratios against the cold start of the same run, image sizes, memory per copy, throughput and
the page-cache effect; also NAME-summary.json and PNG charts NAME-latency.png, NAME-memory.png and
NAME-throughput.png (matplotlib; skipped with a note when it is not installed).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

MODES = ("cold", "criu-cli", "spawn-miss", "spawn-warm", "peer", "lazy")
MODE_LABEL = {"cold": "cold start", "criu-cli": "criu restore (CLI)", "spawn-miss": "spawn, restore on miss",
              "spawn-warm": "spawn, warm pool", "peer": "runtime's own aid",
              "lazy": "criu restore, lazy pages (not in the pool)"}
TARGET = {"spawn-warm": 100, "spawn-miss": 10}  # the goals: this many times faster than cold
MB = 2 ** 20


def _heavy(b: dict) -> bool:
    return bool(b.get("extra_info", {}).get("heavy"))


def _soak(b: dict) -> bool:
    return "growth" in b.get("extra_info", {})


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


def table(data: dict) -> str:
    rows = ["| benchmark | path | rounds | min ms | p50 ms | mean ms | max ms | vs cold (p50) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    benches = [b for b in data.get("benchmarks", []) if not _heavy(b) and not _soak(b)]
    cold = next((b["stats"]["median"] for b in benches
                 if b.get("extra_info", {}).get("path") == "cold"), None)
    for b in benches:
        s = b["stats"]
        path = b.get("extra_info", {}).get("path", "")
        x = f"{cold / s['median']:.1f}x" if cold and s["median"] else "-"
        rows.append(f"| {b['name']} | {path} | {s['rounds']} | {s['min'] * 1e3:.3f} | "
                    f"{s['median'] * 1e3:.3f} | {s['mean'] * 1e3:.3f} | {s['max'] * 1e3:.3f} | {x} |")
    m = data.get("machine_info", {})
    title = "Spawn latency" if benches else "Benchmarks"
    head = (f"# {title}\n\n{data.get('datetime', '')}, {m.get('node', '')}, "
            f"{m.get('cpu', {}).get('brand_raw', '')}, Python {m.get('python_version', '')}\n\n")
    return head + ("\n".join(rows) + "\n" if benches else "")


# --- heavy templates ---------------------------------------------------------------------------------
def heavy_summary(data: dict) -> dict:
    """{template: {"latency": {mode: {...}}, "image": {...}, "memory": {n: {...}},
    "throughput": {c: copies/s}, "page_cache": {...}}} from the heavy benchmarks' extra_info."""
    out: dict = defaultdict(lambda: {"latency": {}, "memory": {}, "throughput": {}})
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if not x.get("heavy"):
            continue
        t = out[x["template"]]
        kind = x["kind"]
        if kind == "latency":
            t["latency"][x["mode"]] = {k: v for k, v in x.items()
                                       if k not in ("heavy", "template", "kind", "mode")}
        elif kind == "image":
            t["image"] = {k: x[k] for k in x if k not in ("heavy", "template", "kind")}
        elif kind == "memory":
            t["memory"][str(x["copies"])] = {k: x[k] for k in ("rss_per_copy_bytes",
                                                                "pss_per_copy_bytes", "pss_total_bytes")}
        elif kind == "throughput":
            t["throughput"][str(x["concurrency"])] = x["copies_per_second"]
        elif kind == "page-cache":
            t["page_cache"] = {k: x[k] for k in x if k not in ("heavy", "template", "kind")}
    for t in out.values():
        cold = t["latency"].get("cold", {}).get("p50_s")
        for mode, lat in t["latency"].items():
            lat["n"] = len(lat.get("samples_s", []))
            lat["x_vs_cold_p50"] = round(cold / lat["p50_s"], 1) if cold and lat.get("p50_s") else None
            if mode in TARGET and lat["x_vs_cold_p50"] is not None:
                lat["target_x"] = TARGET[mode]
                lat["target_met"] = lat["x_vs_cold_p50"] >= TARGET[mode]
    return {k: out[k] for k in sorted(out)}


def _ms(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.1f}")


def heavy_markdown(summary: dict) -> str:
    lines = ["## Heavy templates: time to first correct answer", "",
             ("p50 and p99 (nearest rank) of n rounds after one discarded warm-up round; "
              "x = cold p50 / this p50, cold measured in the same run."), "",
             "| template | path | n | p50 ms | p99 ms | x vs cold | goal | service's own spawn p50 ms |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for name, t in summary.items():
        for mode in MODES:
            lat = t["latency"].get(mode)
            if not lat:
                continue
            goal = ""
            if "target_x" in lat:
                goal = f">= {lat['target_x']}x: {'met' if lat['target_met'] else 'missed'}"
            label = MODE_LABEL[mode] + (f" ({lat['peer']})" if mode == "peer" and lat.get("peer") else "")
            x = lat["x_vs_cold_p50"]
            lines.append(f"| {name} | {label} | {lat['n']} | {_ms(lat['p50_s'])} | "
                         f"{_ms(lat['p99_s'])} | {'-' if mode == 'cold' or x is None else f'{x}x'} | {goal} | "
                         f"{lat.get('service_spawn_p50_ms', '')} |")
    lines += ["", "## Heavy templates: image, memory, throughput, page cache", "",
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

    # latency: p50 bars per template and mode, p99 as a whisker, log scale
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        xs, p50, up = [], [], []
        for j, name in enumerate(names):
            lat = summary[name]["latency"].get(mode)
            if lat:
                xs.append(j + (i - (len(MODES) - 1) / 2) * width)
                p50.append(lat["p50_s"] * 1e3)
                up.append(max(0.0, lat["p99_s"] - lat["p50_s"]) * 1e3)
        ax.bar(xs, p50, width, yerr=[[0] * len(up), up], capsize=2, label=MODE_LABEL[mode])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("time to first correct answer, ms (p50, whisker to p99)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
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
    if len(argv) != 2:
        print("usage: report.py RESULTS.json", file=sys.stderr)
        return 2
    src = Path(argv[1])
    data = json.loads(src.read_text())
    out = src.with_suffix(".md")
    text = table(data)
    if any(_soak(b) for b in data.get("benchmarks", [])):
        text += "\n" + soak_markdown(data)
    summary = heavy_summary(data)
    if summary:
        stem = src.with_suffix("")
        stem.with_name(stem.name + "-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        charts = heavy_charts(summary, stem)
        text += "\n" + heavy_markdown(summary)
        text += "".join(f"\n![{p.stem}]({p.name})\n" for p in charts)
    out.write_text(text)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
