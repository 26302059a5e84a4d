"""Tables for docs/performance.md, from recorded scripts/bench runs.

    python3 scripts/bench_report.py RUN.json [OLDER.json]
        every figure of a recording: ours, the reference, the ratio (the
        median over its runs) and each run's ratio with its 95 % interval
        where the figure is repeated; beside it the ratio of an older
        recording where it has the same figure.
    python3 scripts/bench_report.py --agree A.json B.json
        two recordings of the same figures (two complete runs): each
        repeated figure's ratio in A within B's interval and the other way
        round ("yes"), or not ("NO"); exit 1 if any is not. Beside it,
        whether the two intervals overlap: the weaker test. Two runs of a
        perfectly measured figure put each ratio in the other's 95 %
        interval only about 83 % of the time (the difference of two
        medians spreads sqrt(2) times one median's error), while
        intervals that do not overlap say the runs differ.
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


def interval(row: dict) -> str:
    """A run's ratio with its interval, "0.51 [0.47, 0.55]", or the ratio."""
    if "ratio_low" not in row:
        return fmt(row.get("ratio"))
    return f"{fmt(row['ratio'])} [{fmt(row['ratio_low'])}, {fmt(row['ratio_high'])}]"


def table(new: dict, old: dict) -> None:
    before = {r["name"]: r["ratio"] for r in old["figures"]}
    print("| figure | ours | reference | ratio | each run: ratio [95 % interval] | before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, row in enumerate(new["figures"]):
        runs = "; ".join(interval(run[i]) for run in new["runs"])
        print(f"| `{row['name']}` | {fmt(row['ours'])} | {fmt(row['reference'])} | {fmt(row['ratio'])} "
              f"| {runs} | {fmt(before.get(row['name']))} |")


def rows_of(recording: dict) -> dict:
    """name -> row, of the first run of a recording (a name that comes
    again, as figure 1's at a size --scale also measures, gets " (2)")."""
    out: dict = {}
    for r in recording["runs"][0]:
        name, k = r["name"], 2
        while name in out:
            name, k = f"{r['name']} ({k})", k + 1
        out[name] = r
    return out


def agree(a: dict, b: dict) -> bool:
    ra, rb = rows_of(a), rows_of(b)
    ok = True
    print("| figure | ratio [interval], A | ratio [interval], B | each within the other's | intervals overlap |")
    print("| --- | --- | --- | --- | --- |")
    for name, x in ra.items():
        y = rb.get(name)
        if y is None or "ratio_low" not in x or "ratio_low" not in y:
            continue
        both = x["ratio_low"] <= y["ratio"] <= x["ratio_high"] and y["ratio_low"] <= x["ratio"] <= y["ratio_high"]
        overlap = x["ratio_low"] <= y["ratio_high"] and y["ratio_low"] <= x["ratio_high"]
        ok &= both
        print(f"| `{name}` | {interval(x)} | {interval(y)} | {'yes' if both else 'NO'} | {'yes' if overlap else 'NO'} |")
    return ok


def main() -> int:
    if sys.argv[1] == "--agree":
        return 0 if agree(json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))) else 1
    new = json.load(open(sys.argv[1]))
    old = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {"figures": []}
    table(new, old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
