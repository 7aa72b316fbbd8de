"""Writes docs/BENCHMARKS.md (and its SVG plots) from one run of `scripts/bench`.

    python3 scripts/bench_report.py RESULTS_DIR OUT_MD SVG_DIR

RESULTS_DIR holds what `scripts/bench` collected in one run:
- env.json: date, machine, versions (written by scripts/bench);
- criterion/: criterion's estimates for the benches signatures, meter, stream and store;
- gas.md: the gas tables printed by `scripts/gas`;
- load-idle-<N>.json: `paystream load` with N idle paid sessions (memory against sessions);
- load-payers.json: the largest idle run again with a payer of its own for every session;
- load-paid.json: `paystream load` at about 1,000 vouchers a second (latency distribution).
- load-paid-burst.json: the same with every stream starting as its session opens (bursts).
- load-paid-everysec.json: the steady load with Redis `appendfsync everysec` (the reference).

Every figure is a ratio to a reference measured in the same run (the machine is shared and
noisy): the signature checks against libsecp256k1, the paid stream against the unpaid one, the
meter against the time one paid message takes, durable commits against one session at a time,
a resume with 100,000 channels stored against none, a claim in a batch against a claim alone.
Explanations that do not depend on the run are in this file; earlier runs kept by hand are
appended from docs/bench/history.md.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_table import read_group  # noqa: E402

# The goals the issues set, shown beside the figures.
GOALS = {
    "single_warm_key": 1.25,
    "batch_32": 1.5,
    "batch_128": 1.7,
    "all_cores": 1.9,
    "paid_stream": 0.90,
    "meter_ns": 50.0,
    "idle_kib": 6.0,
    "setups_per_sec": 2500.0,
    "rtt_p99_ms": 5.0,
    "durable_commits": 20000.0,
}


def fmt_int(x):
    return f"{x:,.0f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def met(ok):
    return "met" if ok else "**not met**"


class Run:
    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.env = json.loads((self.root / "env.json").read_text())
        self.criterion = self.root / "criterion"

    def group(self, name):
        return read_group(self.criterion, name)

    def load(self, name):
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def idle_runs(self):
        runs = []
        for path in self.root.glob("load-idle-*.json"):
            runs.append(json.loads(path.read_text()))
        return sorted(runs, key=lambda r: r["sessions"])


def header(run):
    env = run.env
    return f"""# Benchmarks

Written by `scripts/bench` in one run: every figure below comes from the same run, as a ratio to
a reference measured beside it (this machine is shared and noisy: compare the ratios; absolute
times move from run to run). Regenerate with `scripts/bench` (about 30 minutes; `scripts/bench
<target>` runs one criterion bench and prints its table).

| | |
|---|---|
| date | {env['date']} |
| machine | {env['cpu']}, {env['cores']} cores, {env['memory']} |
| load average at the start | {env['loadavg']} |
| commit | `{env['commit']}` |
| rustc | {env['rustc']} |
| redis-server | {env['redis']} |
| anvil | {env['anvil']} |
"""


def signatures(run):
    single = run.group("channel_state_verify")
    batch = run.group("channel_state_verify_batch")
    cores = run.group("channel_state_verify_all_cores")
    table = run.group("key_table")
    if not single:
        return ""
    out = ["""## Channel-state verification (`scripts/bench signatures`, `paystream bench signatures`)

Each function hashes the EIP-712 digest of a state and checks its signature as the server does,
cycling through vouchers by distinct payers: **64 payers** (their tables stay in the core's
cache) and **10,000 payers** (53 MB of tables, far beyond the caches: most table reads go to
memory, prefetched while the scalars are inverted). The one-core groups are measured in the
thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so other processes' slices on this shared machine
do not count; the all-cores group is wall-clock time against the same code on one thread.
Ratios are to libsecp256k1's `verify` (the `secp256k1` crate) on one core, same payers, same
run.

Paths: *k256 constant time* is the check before issue 12 (k256's `lincomb`); *single, cold
key*: the payer's key cached without a table (variable time, GLV, wNAF, a chain of 129
doublings); *single, warm key*: the payer's table (four 32-bit pieces of each GLV half, a chain
of 33); *batch N*: `PayerKeys::verify_batch` on N vouchers whose payers have tables (one
randomized equation, `R` lifted from `r` and `v`).
"""]
    rows = [("single, warm key", "single_warm_key", single, "libsecp256k1_verify", GOALS["single_warm_key"]),
            ("single, cold key", "single_cold_key", single, "libsecp256k1_verify", None)]
    for size, goal in ((8, None), (32, GOALS["batch_32"]), (128, GOALS["batch_128"])):
        rows.append((f"batch of {size}", f"batch_{size}", batch, "libsecp256k1_verify", goal))
    out.append("| path | payers | µs/verification | verifications/s | vs libsecp256k1 | goal |")
    out.append("|---|---|---:|---:|---:|---|")
    for label, name, group, ref, goal in rows:
        for payers in ("64_payers", "10000_payers"):
            row = group.get(f"{name}/{payers}")
            ref_row = group.get(f"{ref}/{payers}")
            if not row:
                continue
            ratio = row[1] / ref_row[1] if ref_row else None
            goal_text = "" if goal is None else f"≥ {goal}x: {met(ratio is not None and ratio >= goal)}"
            out.append(f"| {label} | {payers.split('_')[0]} | {row[0] / 1000:.1f} | {fmt_int(row[1])} | "
                       f"{fmt_ratio(ratio)} | {goal_text} |")
    for payers in ("64_payers", "10000_payers"):
        ref = single.get(f"libsecp256k1_verify/{payers}")
        if ref:
            out.append(f"| libsecp256k1 verify (reference) | {payers.split('_')[0]} | {ref[0] / 1000:.1f} | "
                       f"{fmt_int(ref[1])} | 1.00x | |")
    ref64 = single.get("libsecp256k1_verify/64_payers")
    for label, name in (("k256 constant time (before)", "k256_constant_time"),
                        ("k256 recovery to an address", "k256_recover_address"),
                        ("libsecp256k1 recovery to an address", "libsecp256k1_recover_address")):
        row = single.get(name)
        if row and ref64:
            out.append(f"| {label} | 64 | {row[0] / 1000:.1f} | {fmt_int(row[1])} | {fmt_ratio(row[1] / ref64[1])} | |")
    if cores:
        out.append("""
All cores (wall-clock, both threads busy, against the same function on one thread of the same
group):
""")
        out.append("| path | payers | threads | verifications/s | vs one thread | vs libsecp256k1, one thread | goal |")
        out.append("|---|---|---:|---:|---:|---:|---|")
        for name, (ns, ops) in cores.items():
            # criterion writes the parameter "<set>/<N>_threads" as "<set>_<N>_threads".
            function, _, parameter = name.partition("/")
            payers, _, threads = parameter.partition("_payers_")
            if not threads or threads.startswith("1_"):
                continue
            one = cores.get(f"{function}/{payers}_payers_1_threads")
            ref = cores.get(f"libsecp256k1_verify/{payers}_payers_1_threads")
            vs_one = ops / one[1] if one else None
            goal = "" if function == "libsecp256k1_verify" else \
                f"≥ {GOALS['all_cores']}x: {met(vs_one is not None and vs_one >= GOALS['all_cores'])}"
            out.append(f"| {function} | {payers} | {threads.split('_')[0]} | {fmt_int(ops)} | "
                       f"{fmt_ratio(vs_one)} | {fmt_ratio(ops / ref[1] if ref else None)} | {goal} |")
    if table:
        build = table.get("build")
        if build:
            out.append(f"\nA payer's table: 5,120 bytes (64 affine points: 16 odd multiples of each of four "
                       f"32-bit pieces of `Q`, the `λQ` multiples read off them), built in {build[0] / 1000:.1f} µs; the server keeps them in a "
                       f"byte-bounded LRU beside the keys.")
    return "\n".join(out) + "\n"


def meter_and_stream(run):
    meter = run.group("meter_event")
    stream = run.group("stream_throughput")
    out = []
    paid = stream.get("paid")
    unpaid = stream.get("unpaid")
    if stream and paid and unpaid:
        ratio = paid[1] / unpaid[1]
        out.append(f"""## Paid-stream throughput (`scripts/bench stream`)

One WebSocket session over loopback streaming 20,000 tokens from the token generator
(unthrottled), timed from the request to the last token, against the same stream with no
payment layer (the same generator, bounded queue and `app` frames, no session or meter) in the
same run. The paid session runs on the in-process EVM and the memory store (neither is on the
per-message path); the client answers each `need_voucher` at once.

| stream | µs/message | messages/s | vs unpaid |
|---|---:|---:|---:|
| paid (per message + per byte out, vouchers included) | {paid[0] / 1000:.2f} | {fmt_int(paid[1])} | **{ratio:.2f}x** |
| unpaid | {unpaid[0] / 1000:.2f} | {fmt_int(unpaid[1])} | 1.00x |

Goal at least {GOALS['paid_stream']:.2f}x: {met(ratio >= GOALS['paid_stream'])}. This machine's noise
between two runs of the same code is about ±0.02.
""")
    if meter:
        labels = {
            "per_message": ("per message", "`try_message`"),
            "per_second": ("per second", "`heartbeat` + `advance`"),
            "per_byte_out": ("per byte out", "`try_message` (512 bytes)"),
            "per_byte_in": ("per byte in", "`try_bytes_in` (512 bytes)"),
            "hybrid": ("hybrid (all four)", "`heartbeat` + `try_message`"),
            "hybrid_with_need_voucher_check": ("hybrid, plus the `need_voucher` check",
                                               "`try_message` + `poll_need_voucher`"),
        }
        out.append(f"""## Metering cost per event (`scripts/bench meter`)

One event on a meter with ample credit, 1 µs of simulated time between events (so time-based
tariffs accrue on every event). The reference is what one paid message costs end to end in the
stream bench of the same run ({paid[0]:.0f} ns): the share of a message's time the meter takes.
The goal is under {GOALS['meter_ns']:.0f} ns per event.
""" if paid else """## Metering cost per event (`scripts/bench meter`)
""")
        out.append("| tariff | event | ns/event | share of a paid message |")
        out.append("|---|---|---:|---:|")
        for name, (ns, _) in meter.items():
            label, event = labels.get(name, (name, ""))
            share = f"{100 * ns / paid[0]:.1f}%" if paid else "-"
            out.append(f"| {label} | {event} | {ns:.1f} | {share} |")
        worst = max(ns for ns, _ in meter.values())
        out.append(f"\nThe costliest event: {worst:.1f} ns ({met(worst < GOALS['meter_ns'])}). The hot path is "
                   "integer arithmetic on a 256-bit scaled consumption (`consumed × D`, `D` the tariff's "
                   "common denominator); division happens only when a figure is reported or a voucher "
                   "asked for.\n")
    return "\n".join(out)


def store(run):
    commits = run.group("store_voucher_commits")
    resume = run.group("store_restart_to_resume")
    if not commits:
        return ""
    # criterion writes "<function>/<parameter>" as "<function>_<parameter>".
    commits = {k.replace("/", "_"): v for k, v in commits.items()}
    resume = {k.replace("/", "_"): v for k, v in resume.items()}
    one = commits.get("save_voucher_1_sessions")
    out = ["""## The store (`scripts/bench store`)

A real redis-server on loopback, started by the bench. Durable voucher commits:
`RedisStore::save_voucher` (the fenced compare-and-set script), Redis with `appendonly yes` and
`appendfsync always` (an fsync before Redis answers), each session on its own channel under its
lease:

| function | µs/commit | commits/s | vs one session at a time |
|---|---:|---:|---:|"""]
    for name, (ns, ops) in commits.items():
        label = {"save_voucher_1_sessions": "one session at a time (each commit waits for its fsync)",
                 "save_voucher_512_sessions": "512 sessions at once (pipelined, group-committed)",
                 "plain_set_512_writers": "plain `SET`, 512 writers (the connection without the script)"
                 }.get(name, name)
        out.append(f"| {label} | {ns / 1000:.1f} | {fmt_int(ops)} | {fmt_ratio(ops / one[1] if one else None)} |")
    best = commits.get("save_voucher_512_sessions")
    if best:
        out.append(f"\nGoal {fmt_int(GOALS['durable_commits'])} durable commits/s: "
                   f"{met(best[1] >= GOALS['durable_commits'])}.")
    if resume:
        none = resume.get("first_resume_0_channels_stored")
        out.append("""
A restarted server's first resume: a new server state (a new holder id, nothing in memory) on
the store, then from its first accepted connection to the resumed `session` message (the token
spent, the lease taken, the channel read from the store and from the in-process chain):

| function | ms | vs none stored |
|---|---:|---:|""")
        for name, (ns, _) in resume.items():
            ratio = fmt_ratio(none[0] / ns) if none and name.startswith("first_resume") else ""
            out.append(f"| {name.replace('_', ' ')} | {ns / 1e6:.2f} | {ratio} |")
        out.append("\nNothing is scanned or replayed at start: the goal was under 1 s.")
    return "\n".join(out) + "\n"


def gas(run):
    path = run.root / "gas.md"
    if not path.exists():
        return ""
    return f"""## Gas (`scripts/gas`)

From transaction receipts on a fresh anvil: settle batches of 1, 10 and 100 claims (each on its
own channel, so every claim reads a cold slot as in production), then the other functions. The
marginal gas per claim is the batch's gas over the batch of one, per added claim.

{path.read_text().strip()}
"""


def svg_line_chart(path, title, xlabel, ylabel, series, log_x=False, log_y=False, hline=None):
    """A small dependency-free line chart: series = [(label, [(x, y), ...], colour)]."""
    import math
    width, height, left, right, top, bottom = 640, 360, 70, 20, 40, 50
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts] + ([hline[0]] if hline else [])
    tx = (lambda v: math.log10(max(v, 1e-9))) if log_x else (lambda v: v)
    ty = (lambda v: math.log10(max(v, 1e-9))) if log_y else (lambda v: v)
    x0, x1 = min(map(tx, xs)), max(map(tx, xs))
    y0, y1 = (min(map(ty, ys)), max(map(ty, ys))) if log_y else (0, max(ys) * 1.1)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(v):
        return left + (tx(v) - x0) / (x1 - x0) * (width - left - right)

    def py(v):
        return height - bottom - (ty(v) - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">{xlabel}</text>',
             f'<text x="16" y="{height / 2}" text-anchor="middle" transform="rotate(-90 16 {height / 2})">{ylabel}</text>']

    def ticks(lo, hi, log):
        if log:
            return [10 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)]
        step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1))
        for m in (1, 2, 5, 10):
            if (hi - lo) / (step * m) <= 6:
                step *= m
                break
        first = math.ceil(lo / step) * step
        return [first + i * step for i in range(int((hi - first) / step) + 1)]

    for t in ticks(x0, x1, log_x):
        if x0 - 1e-9 <= tx(t) <= x1 + 1e-9:
            parts.append(f'<line x1="{px(t):.1f}" y1="{height - bottom}" x2="{px(t):.1f}" y2="{height - bottom + 4}" stroke="black"/>')
            parts.append(f'<text x="{px(t):.1f}" y="{height - bottom + 17}" text-anchor="middle">{t:g}</text>')
    for t in ticks(y0, y1, log_y):
        if y0 - 1e-9 <= ty(t) <= y1 + 1e-9:
            parts.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#ddd"/>')
            parts.append(f'<text x="{left - 7}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    if hline:
        value, label = hline
        parts.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{width - right}" y2="{py(value):.1f}" '
                     f'stroke="#c00" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{width - right - 4}" y="{py(value) - 5:.1f}" text-anchor="end" fill="#c00">{label}</text>')
    for i, (label, pts, colour) in enumerate(series):
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{left + 10}" y="{top + 14 + 16 * i}" fill="{colour}">{label}</text>')
    parts.append("</svg>")
    pathlib.Path(path).write_text("\n".join(parts) + "\n")


def load(run, svg_dir):
    idle = run.idle_runs()
    paid = run.load("load-paid.json")
    burst = run.load("load-paid-burst.json")
    if not idle and not paid:
        return ""
    out = ["""## Concurrent sessions, memory, setups and the voucher round trip (`scripts/load`)

One `paystream serve` process (release build) with a real redis-server (`appendfsync always`, as shipped)
and anvil (a block a second), loaded by `paystream load` on the same 2 cores (the load
generator's own work competes with the server's: every figure here includes it). Each run
starts everything afresh.
"""]
    if idle:
        out.append("""Idle paid sessions (`scripts/load N 10 0`: each session opens its channel, signs its first
voucher, makes one short request, then only answers heartbeats). Memory is the server's resident
set while the sessions are held, over the sessions held, less one of two baselines: *KiB/session*
less what it was once the channels were open and before any session (the sessions alone),
*with its channel* less what it was before the server saw any of the channels (a session and what
the server keeps of its channel: the channel cache, the watcher's records). The server runs with
`MIMALLOC_PURGE_DELAY=0` here, so that memory freed after reading the channels' `Opened` events
(10,000 logs in one `eth_getLogs` answer) goes back to the system at once instead of sitting in
the baseline and being reused by the sessions (which made the sessions look 4 KiB cheaper each).

| sessions | held | failed | errors | setups/s | setup p99 ms | server CPU ms/setup | load CPU ms/setup | server RSS MiB | KiB/session | with its channel | server CPU while idle |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|""")
        for r in idle:
            errors = sum(r["errors"].values())
            rss = (r.get("serverRssAfterKiB") or 0) / 1024
            kib = r.get("serverKiBPerSession")
            kib_channel = r.get("serverKiBPerSessionWithChannel")
            cpu = r.get("serverCpuWhileHolding")
            server_ms = r.get("serverCpuMsPerSetup")
            load_ms = r.get("loadCpuMsPerSetup")
            out.append(f"| {fmt_int(r['sessions'])} | {fmt_int(r['held'])} | {r.get('failed', '-')} | {errors} | {fmt_int(r['setupsPerSec'])} | "
                       f"{r['setupMs']['p99']:.1f} | {'-' if server_ms is None else f'{server_ms:.2f}'} | "
                       f"{'-' if load_ms is None else f'{load_ms:.2f}'} | {rss:.1f} | {kib:.1f} | "
                       f"{'-' if kib_channel is None else f'{kib_channel:.1f}'} | "
                       f"{'-' if cpu is None else f'{cpu:.2f} core'} |")
        biggest = idle[-1]
        # The goal's figure is a session with its channel (an idle paid session is both); a
        # run counts only if every session was held with no error.
        kib = biggest.get("serverKiBPerSessionWithChannel") or biggest.get("serverKiBPerSession") or 0
        errors = sum(biggest["errors"].values())
        clean = biggest["held"] == biggest["sessions"] and errors == 0 and not biggest.get("failed")
        out.append(f"\nAt {fmt_int(biggest['sessions'])} sessions: {fmt_int(biggest['held'])} held, "
                   f"{biggest.get('failed', 0)} failed, {errors} errors (goal: all held, none: {met(clean)}); "
                   f"{kib:.1f} KiB a session with its channel "
                   f"(goal ≤ {GOALS['idle_kib']:.0f} KiB: {met(clean and kib <= GOALS['idle_kib'])}); "
                   f"{fmt_int(biggest['setupsPerSec'])} setups/s (goal ≥ {fmt_int(GOALS['setups_per_sec'])}: "
                   f"{met(clean and biggest['setupsPerSec'] >= GOALS['setups_per_sec'])}).")
        server_ms = biggest.get("serverCpuMsPerSetup")
        load_ms = biggest.get("loadCpuMsPerSetup")
        if server_ms and load_ms:
            ceiling = 1000.0 * run.env["cores"] / (server_ms + load_ms)
            out.append(f"What bounds the setups: a setup costs the server {server_ms:.2f} ms of CPU and the "
                       f"load generator {load_ms:.2f} ms (signing, its WebSocket client) on the same "
                       f"{run.env['cores']} cores, Redis and anvil beside them: at most "
                       f"{fmt_int(ceiling)} setups/s if every core did nothing else.")
        payers = run.load("load-payers.json")
        if payers:
            errors = sum(payers["errors"].values())
            clean = payers["held"] == payers["sessions"] and errors == 0 and not payers.get("failed")
            server_ms = payers.get("serverCpuMsPerSetup")
            kib = payers.get("serverKiBPerSessionWithChannel") or 0
            out.append(f"\nWith a payer of its own for every session (`LOAD_PAYERS={payers['sessions']}`: every "
                       f"open checked on a key the server has never seen): {fmt_int(payers['held'])} held, "
                       f"{payers.get('failed', 0)} failed, {errors} errors; {fmt_int(payers['setupsPerSec'])} "
                       f"setups/s (goal ≥ {fmt_int(GOALS['setups_per_sec'])}: "
                       f"{met(clean and payers['setupsPerSec'] >= GOALS['setups_per_sec'])}), setup p99 "
                       f"{payers['setupMs']['p99']:.1f} ms, "
                       f"{'-' if server_ms is None else f'{server_ms:.2f}'} ms of server CPU a setup; "
                       f"{kib:.1f} KiB a session with its channel.")
        pts = [(r["held"], (r.get("serverRssAfterKiB") or 0) / 1024) for r in idle]
        base = [(r["held"], (r.get("serverRssBeforeKiB") or 0) / 1024) for r in idle]
        start = [(r["held"], (r.get("serverRssStartKiB") or 0) / 1024) for r in idle
                 if r.get("serverRssStartKiB")]
        series = [("server RSS with the sessions", pts, "#1f77b4"),
                  ("server RSS with the channels open, before the sessions", base, "#999")]
        if start:
            series.append(("server RSS before it saw the channels", start, "#ccc"))
        svg_line_chart(svg_dir / "memory.svg", "Server memory against idle paid sessions",
                       "sessions held", "resident MiB", series)
        out.append("\n![server memory against sessions](bench/memory.svg)\n")
    if paid:
        rtt = paid["voucherRttMs"]
        # Counts only if every session was held, paying, with no error.
        paid_clean = (paid["held"] == paid["sessions"] and not sum(paid["errors"].values())
                      and not paid.get("failed"))
        out.append(f"""Paid sessions at about 1,000 vouchers a second ({fmt_int(paid['sessions'])} sessions streaming
{paid.get('ratePerSession', 0):g} tokens a second each, held for {paid['holdSecs']:.0f} s, each stream starting at a point
spread over the first {paid.get('staggerMs', 0) / 1000:g} s so that the vouchers arrive at a steady rate):
{paid['vouchersPerSec']:,.0f} vouchers/s and
{fmt_int(paid['messagesPerSec'])} messages/s held, {sum(paid['errors'].values())} errors. The round trip
is from the client sending a voucher (signed) to its `voucher_ack`: the server's signature
check, the fenced write to Redis and both ways over loopback, over
{fmt_int(paid.get('voucherRttSamples', 0))} vouchers:

| arrivals | vouchers/s | p50 | p99 | max | goal p99 |
|---|---:|---:|---:|---:|---|
| steady | {paid['vouchersPerSec']:,.0f} | {rtt['p50']:.2f} ms | {rtt['p99']:.2f} ms | {rtt['max']:.2f} ms | < {GOALS['rtt_p99_ms']:.0f} ms: {met(paid_clean and rtt['p99'] < GOALS['rtt_p99_ms'])} |""")
        if burst:
            b = burst["voucherRttMs"]
            out.append(f"| in bursts (every stream starts as its session opens: all sessions' vouchers fall due within the ramp's {burst['setupSecs']:.2f} s, once a second) | {burst['vouchersPerSec']:,.0f} | {b['p50']:.2f} ms | {b['p99']:.2f} ms | {b['max']:.2f} ms | (not the goal's load) |")
        everysec = run.load("load-paid-everysec.json")
        if everysec:
            e = everysec["voucherRttMs"]
            out.append(f"| steady, Redis `appendfsync everysec` (an fsync a second, not before each answer: not as shipped) | {everysec['vouchersPerSec']:,.0f} | {e['p50']:.2f} ms | {e['p99']:.2f} ms | {e['max']:.2f} ms | (the reference: the p99 as shipped is {rtt['p99'] / e['p99'] if e['p99'] else float('nan'):.2f}x this) |")
        out.append("")
        stalls = paid.get("redisFsyncStalls")
        if stalls:
            out.append(f"What the disk adds, from Redis's own latency monitor during the steady run's hold: "
                       f"{stalls['secondsWithOne']} of its {stalls['holdSecs']:.0f} seconds had an fsync of the "
                       f"AOF that took {stalls['thresholdMs']} ms or more"
                       + (f" (the longest {stalls['maxMs']} ms)" if stalls['secondsWithOne'] else "")
                       + ". With `appendfsync always` Redis answers nothing until its fsync returns, so "
                       "every voucher that arrives during a stall waits for it (the reference row above "
                       "does not).\n")
        server = paid.get("serverVoucherMs") or {}
        if server.get("step"):
            out.append("The server's share, from its `/metrics` histograms (means, and the bucket the 99th "
                       "percentile falls under):\n")
            out.append("| part | mean ms | p99 under ms |")
            out.append("|---|---:|---:|")
            for key, label in (("step", "the whole step: message read to `voucher_ack` sent"),
                               ("signature", "the signature check, queue wait included"),
                               ("store", "the fenced write to Redis")):
                h = server.get(key)
                if h:
                    p99 = "-" if h.get("p99Under") is None else f"{h['p99Under']:g}"
                    out.append(f"| {label} | {h['mean']:.2f} | {p99} |")
            cpu = paid.get("serverCpuWhileHolding")
            if cpu is not None:
                out.append(f"\nThe server used {cpu:.2f} of a core meanwhile: a voucher's step is mostly "
                           "waiting (for a core, for Redis), not working.\n")
        dist = paid.get("voucherRttDistributionMs")
        if dist:
            pts = [(max(ms, 0.01), 100 * q) for q, ms in dist]
            svg_line_chart(svg_dir / "voucher-rtt.svg", "Voucher round trip at ~1,000 vouchers/s",
                           "round trip, ms (log)", "% of vouchers at or under", [("vouchers", pts, "#2ca02c")],
                           log_x=True)
            out.append("![voucher round-trip distribution](bench/voucher-rtt.svg)\n")
    return "\n".join(out)


def main():
    run = Run(sys.argv[1])
    out_md = pathlib.Path(sys.argv[2])
    svg_dir = pathlib.Path(sys.argv[3])
    svg_dir.mkdir(parents=True, exist_ok=True)
    sections = [header(run), signatures(run), meter_and_stream(run), load(run, svg_dir), store(run), gas(run)]
    history = out_md.parent / "bench" / "history.md"
    if history.exists():
        sections.append(history.read_text())
    out_md.write_text("\n".join(s for s in sections if s).rstrip() + "\n")


if __name__ == "__main__":
    main()
