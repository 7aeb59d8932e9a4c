"""Turn a pytest-benchmark JSON file into a Markdown table: bench/results/NAME.md next to NAME.json.

    python bench/report.py bench/results/latest.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def table(data: dict) -> str:
    rows = ["| benchmark | path | rounds | min ms | p50 ms | mean ms | max ms | vs cold (p50) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    benches = data.get("benchmarks", [])
    cold = next((b["stats"]["median"] for b in benches
                 if b.get("extra_info", {}).get("path") == "cold"), None)
    for b in benches:
        s = b["stats"]
        path = b.get("extra_info", {}).get("path", "")
        x = f"{cold / s['median']:.1f}x" if cold and s["median"] else "-"
        rows.append(f"| {b['name']} | {path} | {s['rounds']} | {s['min'] * 1e3:.3f} | "
                    f"{s['median'] * 1e3:.3f} | {s['mean'] * 1e3:.3f} | {s['max'] * 1e3:.3f} | {x} |")
    m = data.get("machine_info", {})
    head = (f"# Spawn latency\n\n{data.get('datetime', '')}, {m.get('node', '')}, "
            f"{m.get('cpu', {}).get('brand_raw', '')}, Python {m.get('python_version', '')}\n\n")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: report.py RESULTS.json", file=sys.stderr)
        return 2
    src = Path(argv[1])
    out = src.with_suffix(".md")
    out.write_text(table(json.loads(src.read_text())))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
