"""Prints criterion results as a table with ratios to a reference measured in the same run.

Reads <criterion dir>/<group>/<function>/new/estimates.json: the median of the samples' times
per iteration, in nanoseconds (the median rather than the mean: on a shared machine a few
samples land on another process's burst, and the median is what the code costs).

A reference is a function of the group, or "group:function" in another group of the same
target. A row named "<function>/<parameter>" is compared with "<reference>/<parameter>" when
that exists (e.g. the same number of payers), else with the reference itself. Groups in
PER_THREAD_COUNT compare each row with the reference on one thread, and get one more column:
the row against the same function on one thread (all cores against one core).
"""
import json
import re
import pathlib
import sys

# For each bench target: the groups to print and, per group, the reference function.
TABLES = {
    "signatures": [
        ("channel_state_verify", "libsecp256k1_verify"),
        ("channel_state_verify_batch", "libsecp256k1_verify"),
        ("channel_state_verify_all_cores", "libsecp256k1_verify"),
        ("key_table", None),
        ("field_k256", None),
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


def median_ns(path):
    data = json.loads(path.read_text())
    return data["median"]["point_estimate"]


# Groups whose rows "<function>/<set>/<N>_threads" get a column against the same row with
# one thread.
PER_THREAD_COUNT = {"channel_state_verify_all_cores"}


def read_group(root, group):
    """{function name: (ns per element, elements per second)} of a group, {} if absent."""
    gdir = root / group
    rows = {}
    if not gdir.is_dir():
        return rows
    for est in sorted(gdir.glob("**/new/estimates.json")):
        name = str(est.parent.parent.relative_to(gdir))
        bench = json.loads((est.parent / "benchmark.json").read_text())
        elements = (bench.get("throughput") or {}).get("Elements", 1)
        ns = median_ns(est)
        rows[name] = (ns / elements, 1e9 * elements / ns)
    return rows


def main():
    root = pathlib.Path(sys.argv[1])
    target = sys.argv[2]
    for group, reference in TABLES.get(target, []):
        rows = read_group(root, group)
        if not rows:
            continue
        ref_group, ref_name = group, reference
        if reference and ":" in reference:
            ref_group, ref_name = reference.split(":", 1)
        ref_rows = read_group(root, ref_group) if reference else {}
        per_thread = group in PER_THREAD_COUNT

        def one_thread(name):
            # criterion writes the parameter "<set>/<N>_threads" as "<set>_<N>_threads".
            return re.sub(r"_\d+_threads$", "_1_threads", name)

        def ref_for(name):
            if not reference:
                return None
            parameter = name.split("/", 1)[1] if "/" in name else None
            if parameter and f"{ref_name}/{parameter}" in ref_rows:
                if per_thread:
                    return ref_rows.get(one_thread(f"{ref_name}/{parameter}"))
                return ref_rows[f"{ref_name}/{parameter}"]
            if ref_name in ref_rows:
                return ref_rows[ref_name]
            return next((v for k, v in ref_rows.items() if k.split("/")[0] == ref_name), None)

        print(f"\n{group}")
        header = f"{'function':<36} {'ns/op':>12} {'ops/s':>14} {'vs ' + (ref_name or '-'):>28}"
        if per_thread:
            header += f" {'vs 1 thread':>12}"
        print(header)
        for name, (ns, ops) in rows.items():
            ref = ref_for(name)
            ratio = f"{ops / ref[1]:.2f}x" if ref else "-"
            line = f"{name:<36} {ns:>12.1f} {ops:>14,.0f} {ratio:>28}"
            if per_thread:
                same = rows.get(one_thread(name))
                line += f" {(f'{ops / same[1]:.2f}x' if same else '-'):>12}"
            print(line)


if __name__ == "__main__":
    main()
