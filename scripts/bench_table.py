"""Prints criterion results as a table with ratios to a reference measured in the same run.

Reads <criterion dir>/<group>/<function>/new/estimates.json (the mean, in nanoseconds).
"""
import json
import pathlib
import sys

# For each bench target: the groups to print and, per group, the reference function.
TABLES = {
    "signatures": [
        ("channel_state_verify", "libsecp256k1_verify"),
        ("channel_state_verify_all_cores", "k256_behind_one_mutex"),
        ("eip712_digest", None),
    ],
    "meter": [
        ("meter_event", None),
    ],
    "stream": [
        ("stream_throughput", "unpaid"),
    ],
    "store": [
        ("store_voucher_commits", "save_voucher_1_sessions"),
        ("store_restart_to_resume", "first_resume_0_channels_stored"),
    ],
}


def mean_ns(path):
    data = json.loads(path.read_text())
    return data["mean"]["point_estimate"]


def main():
    root = pathlib.Path(sys.argv[1])
    target = sys.argv[2]
    for group, reference in TABLES.get(target, []):
        gdir = root / group
        if not gdir.is_dir():
            continue
        rows = []
        for est in sorted(gdir.glob("**/new/estimates.json")):
            name = str(est.parent.parent.relative_to(gdir))
            bench = json.loads((est.parent / "benchmark.json").read_text())
            elements = (bench.get("throughput") or {}).get("Elements", 1)
            ns = mean_ns(est)
            rows.append((name, ns / elements, 1e9 * elements / ns))
        if not rows:
            continue
        ref = next((r for r in rows if reference in (r[0], r[0].split("/")[0])), None)
        print(f"\n{group}")
        print(f"{'function':<34} {'ns/op':>12} {'ops/s':>14} {'vs ' + (reference or '-'):>26}")
        for name, ns, ops in rows:
            ratio = f"{ops / ref[2]:.2f}x" if ref else "-"
            print(f"{name:<34} {ns:>12.1f} {ops:>14,.0f} {ratio:>26}")


if __name__ == "__main__":
    main()
