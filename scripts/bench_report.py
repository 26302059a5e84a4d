"""The table of docs/performance.md, from a recorded scripts/bench run:
every row of its JSON (medians over the runs, each ratio taken within its
run, then the ratio of each run), beside the ratio of an older recording
where it has the same figure.

    python3 scripts/bench_report.py NEW.json [OLD.json]
"""
import json
import sys


def fmt(x) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def main() -> int:
    new = json.load(open(sys.argv[1]))
    old = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {"figures": []}
    before = {r["name"]: r["ratio"] for r in old["figures"]}
    print("| figure | ours | reference | ratio | ratio in each run | before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, row in enumerate(new["figures"]):
        runs = " ".join(fmt(run[i]["ratio"]) for run in new["runs"])
        print(f"| `{row['name']}` | {fmt(row['ours'])} | {fmt(row['reference'])} | {fmt(row['ratio'])} "
              f"| {runs} | {fmt(before.get(row['name']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
