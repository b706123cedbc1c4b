#!/usr/bin/env python3
"""Turns a scripts/bench run directory into the benchmark report and its charts.

    report.py --run-dir DIR --mode full|smoke --out FILE [--connections N]
              [--fresh-rate R] [--wall-s S] [--failed STEP]...

Reads DIR/metrics.jsonl (one line per step, written by measure.py, and per
memory snapshot), each step's raw output (the Go peer's steps, peer-SETTING-*,
are loadgen's like the service's) (ghz JSON, loadgen JSON,
redis-benchmark, kafka producer-perf and e2e-latency text) and DIR/env.json.
Writes FILE (markdown), SVG charts (matplotlib) in FILE's directory under
bench/, and DIR/results.json. The report holds only what this run measured and
how: the hand-written analysis of earlier, named runs lives in
docs/benchmarks-notes.md, which the report links to and never copies. Exits 2
if a step's output shows it failed (no answer, unparseable output, more than
1% errors); missed targets do not fail.

Needs matplotlib and numpy at the versions pinned in requirements.txt beside
it: scripts/bench runs it with the Python of its venv
(${USER_SERVICE_HOME:-~/.cache/user-service}/venv-bench).
"""
import argparse
import json
import os
import re
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024.0

# ------------------------------------------------------------------ parsing


def pct(vals, q):
    """Nearest-rank percentile (numpy's inverted CDF), None without values."""
    if len(vals) == 0:
        return None
    return float(np.percentile(vals, q * 100, method="inverted_cdf"))


def read(run_dir, name):
    with open(os.path.join(run_dir, name + ".out")) as f:
        return f.read()


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


# ghz ends a -z run by closing its connections under the calls still in flight;
# those fail on the client with these messages and are left out of the figures.
GHZ_CUT = ("use of closed network connection", "the client connection is closing")


def parse_ghz(text):
    d = json.loads(text)
    details = d.get("details") or []
    kept = [x for x in details if not any(c in (x.get("error") or "") for c in GHZ_CUT)]
    cut = len(details) - len(kept)
    total_s = (d.get("total") or 0) / 1e9
    lat = np.array([x["latency"] / 1e6 for x in kept], dtype=float)
    if details:
        errors = {}
        for x in kept:
            if x["status"] != "OK":
                errors[x["status"]] = errors.get(x["status"], 0) + 1
        count = len(kept)
        ok = count - sum(errors.values())
        rps = count / total_s if total_s else d.get("rps", 0.0)
        p = {
            "p50": pct(lat, 0.5),
            "p90": pct(lat, 0.9),
            "p99": pct(lat, 0.99),
            "p999": pct(lat, 0.999),
            "max": float(lat.max()) if len(lat) else None,
            "mean": float(lat.mean()) if len(lat) else None,
        }
    else:
        codes = d.get("statusCodeDistribution") or {}
        errors = {k: v for k, v in codes.items() if k != "OK"}
        count, ok, rps = d.get("count", 0), codes.get("OK", 0), d.get("rps", 0.0)
        dist = {int(x["percentage"]): x["latency"] / 1e6 for x in d.get("latencyDistribution") or []}
        p = {
            "p50": dist.get(50),
            "p90": dist.get(90),
            "p99": dist.get(99),
            "p999": None,
            "max": d.get("slowest", 0) / 1e6,
            "mean": d.get("average", 0) / 1e6,
        }
    return {
        "count": count,
        "ok": ok,
        "cut_at_end": cut,
        "errors": errors,
        "error_samples": d.get("errorDistribution") or {},
        "rps": rps,
        "latency_ms": p,
        "concurrency": d.get("options", {}).get("concurrency"),
        "connections": d.get("options", {}).get("connections"),
    }


def parse_loadgen(text):
    d = last_json(text)
    return d


def parse_redis_benchmark(text):
    rps = re.search(r"throughput summary:\s*([\d.]+) requests per second", text)
    summ = re.search(
        r"avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
        text,
    )
    if not rps or not summ:
        raise ValueError("no throughput/latency summary")
    avg, mn, p50, p95, p99, mx = (float(x) for x in summ.groups())
    p999 = None
    section = text.split("Latency by percentile distribution:", 1)
    if len(section) == 2:
        for m in re.finditer(r"^([\d.]+)% <= ([\d.]+) milliseconds", section[1], re.M):
            if float(m.group(1)) >= 99.9:
                p999 = float(m.group(2))
                break
    n = re.search(r"(\d+) requests completed in", text)
    return {
        "count": int(n.group(1)) if n else None,
        "rps": float(rps.group(1)),
        "latency_ms": {"mean": avg, "p50": p50, "p99": p99, "p999": p999, "max": mx},
        "errors": {},
    }


def parse_producer_perf(text):
    m = re.search(
        r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency, "
        r"([\d.]+) ms max latency, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th, (\d+) ms 99.9th",
        text,
    )
    if not m:
        raise ValueError("no producer-perf summary line")
    g = m.groups()
    return {
        "count": int(g[0]),
        "ok": int(g[0]),
        "rps": float(g[1]),
        "mb_s": float(g[2]),
        "latency_ms": {
            "mean": float(g[3]),
            "max": float(g[4]),
            "p50": float(g[5]),
            "p95": float(g[6]),
            "p99": float(g[7]),
            "p999": float(g[8]),
        },
        "errors": {},
    }


def parse_e2e(text):
    avg = re.search(r"Avg latency:\s*([\d.]+) ms", text)
    p = re.search(r"Percentiles: 50th = ([\d.]+), 99th = ([\d.]+), 99.9th = ([\d.]+)", text)
    if not avg or not p:
        raise ValueError("no e2e-latency summary")
    return {
        "latency_ms": {
            "mean": float(avg.group(1)),
            "p50": float(p.group(1)),
            "p99": float(p.group(2)),
            "p999": float(p.group(3)),
            "max": None,
        }
    }


PARSERS = {
    "none": lambda text: {},
    "ghz": parse_ghz,
    "loadgen": parse_loadgen,
    "redis-benchmark": parse_redis_benchmark,
    "producer-perf": parse_producer_perf,
    "e2e-latency": parse_e2e,
}

# Every step the report needs, and how to read it.
STEPS = {
    "seed-produce": "loadgen",
    "seed-apply": "loadgen",
    "ghz-health": "ghz",
    "lg-health": "loadgen",
    "ghz-get": "ghz",
    "lg-get": "loadgen",
    "redis-get": "redis-benchmark",
    "redis-client-pool": "loadgen",
    "redis-client-pool-no-check": "loadgen",
    "redis-client-multiplexed": "loadgen",
    "ghz-create": "ghz",
    "lg-create": "loadgen",
    "lg-create-single": "loadgen",
    "kafka-perf": "producer-perf",
    "lg-fresh-position": "loadgen",
    "lg-fresh-poll": "loadgen",
    "kafka-e2e": "e2e-latency",
    "catchup-produce": "loadgen",
    "catchup": "loadgen",
    "redis-set": "redis-benchmark",
    "lg-get-pool": "loadgen",
    "lg-create-pool": "loadgen",
    "lg-create-single-pool": "loadgen",
    "waiters-0": "none",
    "lg-waiters-one": "loadgen",
    "lg-waiters-many": "loadgen",
    "lg-flood": "loadgen",
    "lg-create-mem": "loadgen",
}
# The Go peer (../shared/peers/go-kafka-redis) in its two settings: the same
# loadgen steps as the service's, its process's CPU in place of the service's.
PEER_SETTINGS = ("tuned", "article")
PEER_STEPS = {"health": "lg-health", "create": "lg-create", "create-single": "lg-create-single", "get": "lg-get"}
for _s in PEER_SETTINGS:
    STEPS[f"peer-{_s}-seed-produce"] = "loadgen"
    for _k in PEER_STEPS:
        STEPS[f"peer-{_s}-{_k}"] = "loadgen"
# Tracing off and on, in rounds (a smoke run has one, a full run two): the
# same loadgen steps on instances over A's topic (scripts/bench, "tracing").
TRACE_ROUNDS = (1, 2)
TRACE_KINDS = {"get": "GetUser, 50 callers", "create": "CreateUser, 100 callers", "create-single": "CreateUser, 1 caller"}
TRACE_MODES = ("off", "on", "sampled")
TRACE_STEPS = [f"trace-{t}-{r}-{k}" for r in TRACE_ROUNDS for t in TRACE_MODES for k in TRACE_KINDS]
for _n in TRACE_STEPS:
    STEPS[_n] = "loadgen"
# Steps older runs lack (a missing one is not a failure; a failed one is).
OPTIONAL = {"lg-get-pool", "lg-create-pool", "lg-create-single-pool", *TRACE_STEPS}
# What the profile in the notes says about a missed target against the peer
# (docs/benchmarks-notes.md, "Against the Go peer").
PEER_NOTES_ANCHOR = "against-the-go-peer-issue-24"
# Steps whose calls fail by design (waits that never end well, a flood past
# the budget); loadgen checks the codes they answer (--expect-codes).
EXPECTED_ERRORS = {"lg-waiters-one", "lg-waiters-many", "lg-flood"}

# ------------------------------------------------------------------ charts (matplotlib)

PALETTE = {
    "raw": "#8c8c8c",
    "ceiling": "#e0a030",
    "service": "#2f6db5",
    "service2": "#6fa0dc",
    "p50": "#6fa0dc",
    "p99": "#2f6db5",
    "p999": "#16365c",
    "max": "#16365c",
    "idle": "#6fa0dc",
    "peak": "#2f6db5",
}
REF_COLOR = "#c0392b"

# The same bytes for the same figures: no date, fixed ids, text kept as text.
matplotlib.rcParams.update(
    {
        "svg.hashsalt": "user-service-bench",
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)


def fmt_num(v):
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def bars(title, unit, rows, series, refs=()):
    """Horizontal grouped bars. rows: [(label, [value per series])];
    series: [(name, color)]; refs: [(value, label)] vertical reference lines."""
    n_series = max(1, len(series))
    bar_h = 0.8 / n_series
    height = 0.9 + len(rows) * (0.22 * n_series + 0.12) + (0.3 if n_series > 1 or refs else 0)
    fig, ax = plt.subplots(figsize=(7.5, height))
    y = np.arange(len(rows))
    vmax = max([v for _, vals in rows for v in vals if v is not None] + [r[0] for r in refs] + [1e-9])
    for i, (name, color) in enumerate(series):
        offs = y - 0.4 + bar_h * (i + 0.5)
        vals = [vals[i] if i < len(vals) else None for _, vals in rows]
        drawn = ax.barh(offs, [0 if v is None else v for v in vals], height=bar_h * 0.9, color=color, label=name)
        ax.bar_label(drawn, labels=["n/a" if v is None else fmt_num(v) for v in vals], padding=3, fontsize=8)
    for (value, label), style in zip(refs, ("--", ":", "-.")):
        ax.axvline(value, color=REF_COLOR, linestyle=style, linewidth=1.2, label=label)
    ax.set_yticks(y, [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, vmax * 1.18)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if vmax >= 100 else f"{v:g}"))
    ax.set_xlabel(unit)
    ax.set_title(title, loc="left", fontweight="bold")
    if n_series > 1 or refs:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def line(title, xlabel, ylabel, points):
    """One line: points [(x, y)]."""
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    ax.plot([p[0] for p in points], [p[1] for p in points], color=PALETTE["service"], linewidth=2)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontweight="bold")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    return fig


def save_svg(fig, path):
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


# ------------------------------------------------------------------ report


class Report:
    def __init__(self, a):
        self.a = a
        self.run_dir = a.run_dir
        self.problems = []
        self.steps = {}
        self.mem = []
        self.redis_mems = []
        self.peer_value = None
        with open(os.path.join(a.run_dir, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if r["type"] == "step":
                    self.steps[r["name"]] = r
                elif r["type"] == "mem":
                    self.mem.append(r)
                elif r["type"] == "redis_mem":
                    self.redis_mems.append(r)
                elif r["type"] == "peer_value":
                    self.peer_value = r.get("strlen")
        try:
            with open(os.path.join(a.run_dir, "env.json")) as f:
                self.env = json.load(f)
        except (OSError, ValueError):
            self.env = {}
        self.r = {}
        for name, kind in STEPS.items():
            self.r[name] = self.load(name, kind)

    def load(self, name, kind):
        meta = self.steps.get(name)
        if meta is None:
            if name not in OPTIONAL:
                self.problems.append(f"{name}: did not run")
            return None
        if meta["rc"] != 0:
            self.problems.append(f"{name}: exit code {meta['rc']}")
        try:
            d = PARSERS[kind](read(self.run_dir, name))
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problems.append(f"{name}: unreadable output ({e})")
            return None
        d["_kind"] = kind
        d["_meta"] = meta
        # Calls that did not succeed, as a share of all.
        count = d.get("count")
        if kind in ("ghz", "loadgen") and count is not None and "errors" in d and name not in EXPECTED_ERRORS:
            errs = sum(d["errors"].values())
            if count == 0 or d.get("ok", count - errs) == 0:
                self.problems.append(f"{name}: no successful call")
            elif errs / count > 0.01:
                self.problems.append(f"{name}: {errs} of {count} calls failed: {d['errors']}")
        if d.get("failed") is True:
            self.problems.append(f"{name}: the tool reported a failure")
        if name.startswith("lg-fresh") and d.get("creates_ok"):
            if d.get("not_seen", 0) / d["creates_ok"] > 0.01:
                self.problems.append(f"{name}: {d['not_seen']} users never became readable")
        return d

    # -- helpers
    def cpu_per_req(self, name, who="svc"):
        d, m = self.r.get(name), self.steps.get(name)
        if not d or not m or m.get(f"{who}_cpu_s") is None:
            return None
        n = d.get("count") or d.get("creates_ok")
        if not n:
            return None
        return m[f"{who}_cpu_s"] / n * 1e6  # µs per request

    def lat(self, name, key):
        d = self.r.get(name)
        if not d:
            return None
        lm = d.get("latency_ms") or d.get("freshness_ms") or {}
        return lm.get(key)

    def rps(self, name):
        d = self.r.get(name)
        return d.get("rps") if d else None

    @staticmethod
    def ratio(a, b):
        return a / b if a is not None and b else None

    def notes_rel(self, out_path):
        notes = os.path.normpath(os.path.join(HERE, "..", "..", "docs", "benchmarks-notes.md"))
        return os.path.relpath(notes, os.path.dirname(os.path.abspath(out_path)))

    def mem_delta(self, before, after):
        b = next((m for m in self.redis_mems if m["phase"] == before), None)
        a = next((m for m in self.redis_mems if m["phase"] == after), None)
        if not b or not a or b.get("used_memory") is None or a.get("used_memory") is None:
            return None
        return a["used_memory"] - b["used_memory"], a["keys"] - b["keys"]

    def peer_mem(self):
        """Redis' memory per user: the service's, users created through
        CreateUser with request ids on B's populated read model; the peer's,
        the users its consumers applied from the seeding (both settings)."""
        out = {}
        d, created = self.mem_delta("before-creates", "after-creates"), self.r.get("lg-create-mem")
        if d and created and created.get("ok") and created.get("avg_user_json_bytes"):
            n, js = created["ok"], created["avg_user_json_bytes"]
            out["service"] = {"users": n, "per_user": d[0] / n, "json": js, "ratio": d[0] / n / js}
        d = self.mem_delta("before-peer-seed", "after-peer-seed")
        if d and d[1] > 0:
            per = d[0] / d[1]
            out["peer"] = {"users": d[1], "per_user": per, "value": self.peer_value,
                           "ratio": per / self.peer_value if self.peer_value else None}
        return out

    def peer_targets(self, verdict, smoke):
        """Issue 24's targets: (target, service, peer, verdict, what explains a miss)."""
        G = []
        pt = "peer-tuned-"
        sc, pc = self.rps("lg-create"), self.rps(pt + "create")
        q = self.ratio(sc, pc)
        G.append(("CreateUser at 100 callers ≥ 1.5× the peer's creates/s",
                  f"{fmt_num(sc)}/s = {fmt_num(q)}× the peer", f"{fmt_num(pc)}/s",
                  verdict(None if q is None else q >= 1.5), "a create's profile"))
        a, b = self.cpu_per_req("lg-create"), self.cpu_per_req(pt + "create")
        G.append(("CreateUser at 100 callers: CPU per create ≤ the peer's",
                  f"{fmt_num(a)} µs", f"{fmt_num(b)} µs",
                  verdict(None if a is None or b is None else a <= b), "a create's profile"))
        a, b = self.lat("lg-create", "p99"), self.lat(pt + "create", "p99")
        G.append(("CreateUser at 100 callers: p99 ≤ the peer's",
                  f"{fmt_num(a)} ms", f"{fmt_num(b)} ms",
                  verdict(None if a is None or b is None else a <= b), "a create's profile"))
        a, b = self.lat("lg-create-single", "p50"), self.lat(pt + "create-single", "p50")
        G.append(("Lone caller: CreateUser p50 ≤ the peer's p50 + 0.5 ms",
                  f"{fmt_num(a)} ms", f"{fmt_num(b)} ms" + ("" if b is None else f" (+ 0.5 = {fmt_num(b + 0.5)} ms)"),
                  verdict(None if a is None or b is None else a <= b + 0.5), "a lone create's latency"))
        sg, pg = self.rps("lg-get"), self.rps(pt + "get")
        q = self.ratio(sg, pg)
        G.append(("GetUser (50 callers) ≥ 2× the peer's calls/s",
                  f"{fmt_num(sg)}/s = {fmt_num(q)}× the peer", f"{fmt_num(pg)}/s",
                  verdict(None if q is None else q >= 2), "a read's profile"))
        sh, ph = self.rps("lg-health"), self.rps(pt + "health")
        q, qp = self.ratio(sg, sh), self.ratio(pg, ph)
        G.append(("GetUser ≥ 0.85× Check in calls/s",
                  f"{fmt_num(sg)} vs {fmt_num(sh)}/s = {fmt_num(q)}×",
                  f"{fmt_num(pg)} vs {fmt_num(ph)}/s = {fmt_num(qp)}×",
                  verdict(None if q is None else q >= 0.85), "a read's profile"))
        a, b = self.cpu_per_req("lg-get"), self.cpu_per_req("lg-health")
        pa, pb = self.cpu_per_req(pt + "get"), self.cpu_per_req(pt + "health")
        q, qp = self.ratio(a, b), self.ratio(pa, pb)
        G.append(("GetUser: CPU per call ≤ 1.25× Check's",
                  f"{fmt_num(a)} vs {fmt_num(b)} µs = {fmt_num(q)}×",
                  f"{fmt_num(pa)} vs {fmt_num(pb)} µs = {fmt_num(qp)}×",
                  verdict(None if q is None else q <= 1.25), "a read's profile"))
        m = self.peer_mem()
        sm, pm = m.get("service"), m.get("peer")
        G.append((
            "Redis memory per user created as clients create them (CreateUser with a request id) ≤ 1.5× its JSON",
            "—" if not sm else
            f"{sm['per_user']:.0f} B vs {sm['json']:.0f} B of JSON = {sm['ratio']:.2f}× over {sm['users']:,} creates",
            "—" if not pm else
            f"{pm['per_user']:.0f} B per user" + (f" (its value {pm['value']} B = {pm['ratio']:.2f}×)" if pm["ratio"] else ""),
            verdict(None if not sm else sm["ratio"] <= 1.5) + (" (smoke: too few users to trust)" if smoke and sm else ""),
            "the read model's layout"))
        return G

    def peer_section(self, L):
        """Section 8: the service and the peer's two settings, step by step."""
        cols = [("service", "lg-"), ("Go peer, tuned (`-batch-timeout 1ms`)", "peer-tuned-"),
                ("Go peer, article (1 s batch timeout)", "peer-article-")]

        def cell(fn):
            return " | ".join(fn(prefix) for _, prefix in cols)

        def count(p, step):
            d = self.r.get(p + step)
            return f"{d['count']:,}" if d and d.get("count") is not None else "—"

        def rss(p):
            v = (self.steps.get(p + "get") or {}).get("svc_rss_kb")
            return "—" if v is None else f"{v / MIB:.1f}"

        m = self.peer_mem()
        rows = [
            ("Check, 50 callers: calls/s", lambda p: fmt_num(self.rps(p + "health"))),
            ("Check: CPU µs/call", lambda p: fmt_num(self.cpu_per_req(p + "health"))),
            ("GetUser, 50 callers: calls/s", lambda p: fmt_num(self.rps(p + "get"))),
            ("GetUser: p50 / p99 ms",
             lambda p: f"{fmt_num(self.lat(p + 'get', 'p50'))} / {fmt_num(self.lat(p + 'get', 'p99'))}"),
            ("GetUser: CPU µs/call", lambda p: fmt_num(self.cpu_per_req(p + "get"))),
            ("GetUser / Check, calls/s", lambda p: fmt_num(self.ratio(self.rps(p + "get"), self.rps(p + "health")))),
            ("GetUser: Redis CPU µs/call", lambda p: fmt_num(self.cpu_per_req(p + "get", "redis"))),
            ("CreateUser, 100 callers: creates/s", lambda p: fmt_num(self.rps(p + "create"))),
            ("CreateUser, 100 callers: p50 / p99 ms",
             lambda p: f"{fmt_num(self.lat(p + 'create', 'p50'))} / {fmt_num(self.lat(p + 'create', 'p99'))}"),
            ("CreateUser, 100 callers: CPU µs/create", lambda p: fmt_num(self.cpu_per_req(p + "create"))),
            ("CreateUser, 100 callers: Kafka broker CPU µs/create",
             lambda p: fmt_num(self.cpu_per_req(p + "create", "kafka"))),
            ("CreateUser, 100 callers: Redis CPU µs/create",
             lambda p: fmt_num(self.cpu_per_req(p + "create", "redis"))),
            ("CreateUser, 1 caller: p50 / p99 ms",
             lambda p: f"{fmt_num(self.lat(p + 'create-single', 'p50'))} / "
             f"{fmt_num(self.lat(p + 'create-single', 'p99'))}"),
            ("CreateUser, 1 caller: calls", lambda p: count(p, "create-single")),
            ("RSS after GetUser, MiB", rss),
        ]
        L.append("## 8. The Go peer: the same steps\n")
        L.append(
            "The seed article's service in Go (`../shared/peers/go-kafka-redis`: kafka-go's `Writer` and a "
            "`Reader` in a consumer group, go-redis, one `SET user_<id>` per event), built once by "
            "`scripts/bench` and run in its two settings side by side, each on its own topic (12 partitions), "
            "consumer group and Redis db, after the service's steps above and with the service stopped. "
            "*article*: kafka-go's defaults, a 1 s batch timeout, so a create waits about a second "
            "whatever the load (its create rounds are short); *tuned*: `-batch-timeout 1ms`, the one-line "
            "change a Go engineer makes, and the peer the targets compare with. Each was seeded with the "
            "same users as the service (events straight to its topic, applied by its consumer), so GetUser "
            "finds every one. CPU per call is each process's own (utime+stime from `/proc/PID/stat` over the "
            "step); the service column repeats sections 1 and 2's loadgen rows. The peer answers a create "
            "once Kafka acknowledged it, not once its read model applied it, and keeps no request ids.\n"
        )
        L.append("| | " + " | ".join(c for c, _ in cols) + " |\n|---|" + "---|" * len(cols))
        for label, fn in rows:
            L.append(f"| {label} | {cell(fn)} |")
        sm, pm = m.get("service"), m.get("peer")
        L.append(
            "| Redis memory per user, B | "
            + ("—" if not sm else f"{sm['per_user']:.0f} (created with a request id, {sm['users']:,} users)")
            + " | "
            + ("—" if not pm else f"{pm['per_user']:.0f} (seeded, {pm['users']:,} users over both settings)")
            + " | |"
        )
        L.append(
            "\nRedis' memory per user is `INFO memory`'s `used_memory` before and after: for the service, "
            "CreateUser calls with request ids (as loadgen and the clients send them) on instance B's read "
            "model right after the catch-up, so each user joins a bucket that exists (the users' JSON, as "
            "`produce-events` measures it, from the answers); for the peer, the seeded users of both "
            "settings (its value is its own JSON with `create_time`). Any other client of this Redis counts "
            "too.\n"
        )
        rows = [
            ("Check, 50 callers", "health"),
            ("GetUser, 50 callers", "get"),
            ("CreateUser, 100 callers", "create"),
        ]
        series = [("service", PALETTE["service"]), ("peer, tuned", PALETTE["ceiling"]), ("peer, article", PALETTE["raw"])]
        self.chart(
            L,
            "peer-throughput",
            bars(
                "The service and the Go peer: calls/s",
                "calls/s",
                [(lbl, [self.rps(p + st) for _, p in cols]) for lbl, st in rows],
                series,
            ),
        )
        self.chart(
            L,
            "peer-cpu",
            bars(
                "The service and the Go peer: CPU per call (µs, the process's own)",
                "µs per call",
                [(lbl, [self.cpu_per_req(p + st) for _, p in cols]) for lbl, st in rows],
                series,
            ),
        )

    # -- the document
    def write(self):
        out_path = self.a.out
        chart_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "bench")
        os.makedirs(chart_dir, exist_ok=True)
        self.charts = {}
        smoke = self.a.mode == "smoke"
        r = self.r
        L = []
        e = self.env
        L.append("# Benchmarks\n")
        L.append(
            f"Generated by `scripts/bench{' --smoke' if smoke else ''}` on {e.get('date', '?')}, "
            f"commit `{e.get('commit', '?')}`, in {self.a.wall_s or '?'} s. "
            + (
                "**Smoke run**: a few seconds per step and low rates, so the figures only show "
                "that the harness works; the full run (`scripts/bench`) gives the numbers to quote.\n"
                if smoke
                else "**Full run.**\n"
            )
        )
        if self.problems or self.a.failed:
            L.append("**Failed steps:** " + "; ".join(self.a.failed + self.problems) + "\n")

        # ---- figures
        reads_rows = [
            ("redis-benchmark GET (raw)", "redis-get", "raw"),
            ("Health/Check, ghz", "ghz-health", "ceiling"),
            ("Health/Check, loadgen", "lg-health", "ceiling"),
            ("GetUser, ghz", "ghz-get", "service"),
            ("GetUser, loadgen", "lg-get", "service"),
        ]
        write_rows = [
            ("producer-perf, acks=all (raw)", "kafka-perf", "raw"),
            ("CreateUser, ghz, 100 callers", "ghz-create", "service"),
            ("CreateUser, loadgen, 100 callers", "lg-create", "service"),
            ("CreateUser, loadgen, 1 caller", "lg-create-single", "service2"),
        ]
        raw_get = self.rps("redis-get")
        raw_prod = self.rps("kafka-perf")
        fresh = r.get("lg-fresh-position")
        fresh_poll = r.get("lg-fresh-poll")
        catch = r.get("catchup")
        raw_set = self.rps("redis-set")

        # ---- targets
        T = []

        def verdict(ok, na=False):
            if na:
                return "n/a"
            if ok is None:
                return "no data"
            return "met" if ok else "**NOT met**"

        # The targets against the Go peer (issue 24), the tuned setting of
        # the same run, with the service's own Check ceiling.
        G = self.peer_targets(verdict, smoke)

        # The performance targets (issue 15): ratios and CPU per call against
        # the health Check ceiling of the same tool in the same run.
        P = []
        check, check_cpu = self.rps("lg-health"), self.cpu_per_req("lg-health")
        for call, step, rate_min, cpu_max, lat_key, lat_max, lat_label in (
            ("GetUser", "lg-get", 0.85, 1.25, "p99", 5, "p99 ≤ 5 ms"),
            ("CreateUser", "lg-create", 0.5, 2, "p99", 10, "p99 ≤ 10 ms (100 callers)"),
        ):
            rate, cpu = self.rps(step), self.cpu_per_req(step)
            # GetUser's ratio and CPU to Check are in the peer's table (G) above.
            if call != "GetUser":
                q = self.ratio(rate, check)
                P.append(
                    (
                        f"{call} ≥ {rate_min}× Check in calls/s" + (" at 100 callers" if call == "CreateUser" else ""),
                        f"{fmt_num(rate)} vs {fmt_num(check)} calls/s = {fmt_num(q)}×",
                        verdict(None if q is None else q >= rate_min),
                    )
                )
                q = self.ratio(cpu, check_cpu)
                P.append(
                    (
                        f"{call} ≤ {cpu_max}× Check's service CPU per call",
                        f"{fmt_num(cpu)} vs {fmt_num(check_cpu)} µs = {fmt_num(q)}×",
                        verdict(None if q is None else q <= cpu_max),
                    )
                )
            v = self.lat(step, lat_key)
            P.append((f"{call} {lat_label}", f"{fmt_num(v)} ms", verdict(None if v is None else v <= lat_max)))
        v = self.lat("lg-create-single", "p50")
        P.append(
            ("CreateUser p50 ≤ 3 ms (a lone caller)", f"{fmt_num(v)} ms", verdict(None if v is None else v <= 3))
        )
        self.redis_mem = None
        before = next((m for m in self.redis_mems if m["phase"] == "before-catchup"), None)
        after = next((m for m in self.redis_mems if m["phase"] == "after-catchup"), None)
        seeded = r.get("catchup-produce")
        if before and after and seeded and seeded.get("avg_user_json_bytes") and catch:
            users = catch["events"]
            per_user = (after["used_memory"] - before["used_memory"]) / users
            json_b = seeded["avg_user_json_bytes"]
            q = per_user / json_b
            self.redis_mem = {"users": users, "per_user": per_user, "json": json_b, "ratio": q,
                              "keys": after["keys"] - before["keys"]}
            P.append(
                (
                    "Redis memory per user ≤ 1.5× its JSON bytes (`INFO memory`, no request id held)",
                    f"{per_user:.0f} B per user vs {json_b:.0f} B of JSON = {q:.2f}× over {users:,} users",
                    verdict(q <= 1.5) + (" (smoke: too few users to trust)" if smoke else ""),
                )
            )
        else:
            P.append(("Redis memory per user ≤ 1.5× its JSON bytes", "—", verdict(None)))
        if catch:
            cr = catch.get("rate_applying")
            P.append(
                (
                    "Rebuild (an empty read model replaying the log) ≥ 100k events/s",
                    f"{fmt_num(cr)} events/s over {catch['events']:,} events",
                    verdict(None if cr is None else cr >= 100000)
                    + (" (smoke: too few events to trust)" if smoke else ""),
                )
            )

        for tool, get, health in (("loadgen", "lg-get", "lg-health"), ("ghz", "ghz-get", "ghz-health")):
            g, h = self.rps(get), self.rps(health)
            q = self.ratio(g, raw_get)
            T.append(
                (
                    f"Reads ≥ 0.5 × raw Redis GET ({tool})",
                    f"{fmt_num(g)} vs {fmt_num(raw_get)} req/s = {fmt_num(q)}×",
                    verdict(None if q is None else q >= 0.5),
                )
            )
            q = self.ratio(g, h)
            T.append(
                (
                    f"Reads ≥ 0.75 × Health/Check ceiling ({tool})",
                    f"{fmt_num(g)} vs {fmt_num(h)} req/s = {fmt_num(q)}×",
                    verdict(None if q is None else q >= 0.75),
                )
            )
            p = self.lat(get, "p99")
            T.append((f"Reads p99 ≤ 5 ms ({tool})", f"{fmt_num(p)} ms", verdict(None if p is None else p <= 5)))
        if r.get("lg-get-pool"):
            g, h = self.rps("lg-get-pool"), self.rps("lg-health")
            q = self.ratio(g, h)
            T.append(
                (
                    "Reads ≥ 0.75 × Health/Check ceiling (loadgen, `REDIS_CLIENT=pool`)",
                    f"{fmt_num(g)} vs {fmt_num(h)} req/s = {fmt_num(q)}×",
                    verdict(None if q is None else q >= 0.75),
                )
            )
            q = self.ratio(g, raw_get)
            T.append(
                (
                    "Reads ≥ 0.5 × raw Redis GET (loadgen, `REDIS_CLIENT=pool`)",
                    f"{fmt_num(g)} vs {fmt_num(raw_get)} req/s = {fmt_num(q)}×",
                    verdict(None if q is None else q >= 0.5),
                )
            )
            p = self.lat("lg-get-pool", "p99")
            T.append(
                (
                    "Reads p99 ≤ 5 ms (loadgen, `REDIS_CLIENT=pool`)",
                    f"{fmt_num(p)} ms",
                    verdict(None if p is None else p <= 5),
                )
            )
        writes = [("loadgen", "lg-create"), ("ghz", "ghz-create")]
        if r.get("lg-create-pool"):
            writes.append(("loadgen, `REDIS_CLIENT=pool`", "lg-create-pool"))
        for tool, name in writes:
            w = self.rps(name)
            q = self.ratio(w, raw_prod)
            T.append(
                (
                    f"Writes ≥ 0.5 × producer-perf records/s ({tool})",
                    f"{fmt_num(w)} vs {fmt_num(raw_prod)} /s = {fmt_num(q)}×",
                    verdict(None if q is None else q >= 0.5),
                )
            )
        p50, p99 = self.lat("lg-create-single", "p50"), self.lat("lg-create-single", "p99")
        T.append(
            (
                "Single caller: single-digit-ms CreateUser (p99 < 10 ms)",
                f"p50 {fmt_num(p50)} ms, p99 {fmt_num(p99)} ms",
                verdict(None if p99 is None else p99 < 10),
            )
        )
        if r.get("lg-create-single-pool"):
            p50 = self.lat("lg-create-single-pool", "p50")
            p99 = self.lat("lg-create-single-pool", "p99")
            T.append(
                (
                    "Single caller, `REDIS_CLIENT=pool`: p99 < 10 ms",
                    f"p50 {fmt_num(p50)} ms, p99 {fmt_num(p99)} ms",
                    verdict(None if p99 is None else p99 < 10),
                )
            )
        if fresh:
            fp99 = fresh["freshness_ms"]["p99"]
            rate = fresh.get("achieved_rate", 0)
            at_rate = rate >= 0.95 * 2000
            T.append(
                (
                    "Freshness p99 ≤ 25 ms at 2,000 creates/s",
                    f"p99 {fmt_num(fp99)} ms at {fmt_num(rate)} creates/s",
                    verdict(fp99 <= 25 and at_rate, na=smoke)
                    + (" (smoke rate)" if smoke else ""),
                )
            )
        if catch:
            cr = catch.get("rate_applying")
            T.append(
                (
                    "Catch-up ≥ 50,000 events/s",
                    f"{fmt_num(cr)} events/s over {catch['events']:,} events "
                    f"({fmt_num(catch.get('rate_from_start'))}/s from process start)",
                    verdict(None if cr is None else cr >= 50000)
                    + (" (smoke: too few events to trust)" if smoke else ""),
                )
            )
        idle = [m for m in self.mem if m["svc_tag"] == "A" and m["phase"] == "idle"]
        peaks = [m["hwm_kb"] for m in self.mem if m["phase"] != "idle"]
        if idle:
            v = idle[0]["rss_kb"] / MIB
            T.append(("RSS idle ≤ 64 MiB", f"{v:.1f} MiB", verdict(v <= 64)))
        if peaks:
            v = max(peaks) / MIB
            T.append(("RSS under load ≤ 256 MiB", f"{v:.1f} MiB (peak of all phases)", verdict(v <= 256)))

        # Untrusted callers: what waiting calls cost Redis, and a flood.
        def cmd_rate(name):
            m = self.steps.get(name)
            if not m or m.get("redis_commands") is None or not m.get("wall_s"):
                return None
            return sum(v for k, v in m["redis_commands"].items() if k != "info") / m["wall_s"]

        self.waiting = {n: cmd_rate(n) for n in ("waiters-0", "lg-waiters-one", "lg-waiters-many", "lg-get")}
        base, many = self.waiting["waiters-0"], self.waiting["lg-waiters-many"]
        added = None if base is None or many is None else max(many - base, 0.0)
        n_many = (self.steps.get("lg-waiters-many") or {}).get("waiters", "N")
        one = self.waiting["lg-waiters-one"]
        added_one = None if base is None or one is None else max(one - base, 0.0)

        def own_reads(name):
            # A call whose id is on the partition it waits on reads it first
            # (one HMGET of the checkpoint and one HGET of the user, in one
            # pipeline), as it would without waiting; the poller sends HMGET
            # alone. So 2 × HGET is the calls' own reads, the rest the wait's.
            m = self.steps.get(name) or {}
            cmds = m.get("redis_commands") or {}
            return 2 * cmds.get("hget", 0) / m["wall_s"] if m.get("wall_s") else None

        reads_many, reads_one = own_reads("lg-waiters-many"), own_reads("lg-waiters-one")
        if added is not None and added_one is not None and reads_many is not None and reads_one is not None:
            wait_many = max(added - reads_many, 0.0)
            wait_one = max(added_one - reads_one, 0.0)
            # One waiter costs exactly one poller on its partition; many on the
            # same partition should cost no more (a quarter's slack for noise).
            P.append(
                (
                    f"{n_many} waiting GetUser calls cost Redis ≤ one poller per partition waited on",
                    f"waiting: +{fmt_num(wait_many)} commands/s with {n_many} calls on one partition, "
                    f"+{fmt_num(wait_one)}/s with 1 (one poller) = {fmt_num(self.ratio(wait_many, wait_one))}× "
                    f"(the calls' own reads of their user, beside: +{fmt_num(reads_many)}/s)",
                    verdict(wait_many <= 1.25 * wait_one),
                )
            )
        flood_idle = [m for m in self.mem if m["svc_tag"] == "D" and m["phase"] == "idle"]
        flood_peak = [m for m in self.mem if m["svc_tag"] == "D" and m["phase"] == "flood"]
        if flood_idle and flood_peak:
            i, pk = flood_idle[0]["rss_kb"] / MIB, flood_peak[0]["hwm_kb"] / MIB
            T.append(
                (
                    "RSS under a flood of 10× the call budget ≤ idle + 64 MiB",
                    f"{i:.1f} MiB idle, {pk:.1f} MiB peak",
                    verdict(pk <= i + 64),
                )
            )

        L.append("## Targets\n")
        notes_rel = self.notes_rel(out_path)
        L.append(
            "Against the Go peer (issue 24): the seed article's service in Go "
            "(`../shared/peers/go-kafka-redis`, kafka-go and go-redis) behind this project's gRPC contract, "
            "with kafka-go's batch timeout at 1 ms (\"tuned\", the peer to beat), driven by the same loadgen "
            "steps in this run (section 8 has both its settings). CPU per call is each process's own, from "
            "`/proc/PID/stat`. Where a target is missed, the last column links the notes on the service's "
            "profile (`scripts/bench.d/profile`), which say where its time goes.\n"
        )
        L.append("| target | service | Go peer, tuned (same run) | verdict | if missed |\n|---|---|---|---|---|")
        for t in G:
            why = f"[{t[4]}]({notes_rel}#{PEER_NOTES_ANCHOR})" if "NOT" in t[3] else ""
            L.append(f"| {t[0]} | {t[1]} | {t[2]} | {t[3]} | {why} |")
        L.append("")
        L.append(
            "The performance targets of issue 15: throughput as a ratio to the health `Check` ceiling measured by the "
            "same tool (loadgen) in this run, and the service's CPU per call against Check's, since "
            "throughput on this shared machine swings between runs.\n"
        )
        L.append("| target | measured | verdict |\n|---|---|---|")
        for t in P:
            L.append(f"| {t[0]} | {t[1]} | {t[2]} |")
        L.append("")
        L.append("Earlier targets, still measured:\n")
        L.append("| target | measured | verdict |\n|---|---|---|")
        for t in T:
            L.append(f"| {t[0]} | {t[1]} | {t[2]} |")
        L.append("")
        T = [(g[0], f"{g[1]}; peer {g[2]}", g[3]) for g in G] + P + T

        # ---- machine
        L.append("## Machine\n")
        L.append("| | |\n|---|---|")
        for k, label in (
            ("nproc", "CPUs (`nproc`)"),
            ("cpu_model", "CPU model (`lscpu`)"),
            ("mem_gib", "memory (GiB)"),
            ("kernel", "kernel"),
            ("loadavg", f"load average at the {e.get('loadavg_at', 'end')} of the run"),
            ("kafka", "Apache Kafka"),
            ("redis", "Redis"),
            ("rustc", "rustc"),
            ("java", "Java (Kafka and its tools)"),
            ("ghz", "ghz"),
            ("redis_benchmark", "redis-benchmark"),
        ):
            v = e.get(k, "?")
            if isinstance(v, list):
                v = " ".join(v)
            L.append(f"| {label} | {v} |")
        L.append(
            f"\nThe service, Redis, the Kafka broker (JVM) and the load generators all ran on this "
            f"machine ({e.get('nproc', '?')} CPUs) at once, so every figure includes the others' CPU. "
            "How much figures vary between runs is not measured by a run: see the notes linked at "
            "the end.\n"
        )

        # ---- how
        L.append("## How it was measured\n")
        L.append(
            "```sh\nscripts/bench            # full run; writes this file and docs/bench/*.svg, and copies\n"
            "                         # its figures into README.md's \"In short\"\n"
            "scripts/bench --smoke    # a few seconds per step; writes the report under "
            "~/.cache/user-service/bench/<run>/\n```\n"
        )
        L.append(
            "The script builds the release binaries, starts the stack (`scripts/stack up`), then a "
            "release `user-service` with its own topic, consumer group and key prefix (Redis db "
            f"14, `DRAIN_GRACE=0s`, "
            + (
                f"**and `{self.a.service_env}`**, everything else default). "
                if self.a.service_env
                else "everything else default). "
            )
            + "Before any measured step, CreateUser runs unmeasured for "
            + (lambda w: f"{w['wall_s']:.0f} s" if w and w.get("wall_s") else "a while")(self.steps.get("warm-up"))
            + " to warm the freshly started broker's JVM. "
            + f"gRPC clients use {self.a.connections} HTTP/2 connections each. Every step is bounded in "
            "time. The service's CPU is utime+stime from `/proc/PID/stat` over the step, divided by "
            "the calls the step made; memory is `VmRSS`, and the peak `VmHWM` per phase (reset with "
            "`/proc/PID/clear_refs`).\n"
        )
        L.append(
            "- **loadgen** is the workspace's tool `tools/loadgen` (`cargo build -p loadgen --release`): "
            "tonic's client, closed loop (each caller waits for its answer), many calls in flight over a "
            "few connections, bounded retries with a fresh connection on UNAVAILABLE, an h2/GOAWAY "
            "INTERNAL or a transport CANCELLED; its percentiles come from an HdrHistogram of "
            "microseconds (`hdrhistogram` crate, 3 significant digits). "
            f"**ghz** ({e.get('ghz', '?')}) calls by reflection; its percentiles, p99.9 included, are "
            "taken from its per-call details (numpy, nearest rank).\n"
            "- Reads: GetUser on ids seeded through the projector (events produced straight to the "
            "topic); redis-benchmark GETs as many keys of 100 bytes in Redis db 15, 50 clients, no "
            "pipelining.\n"
            "- Writes: CreateUser with service-assigned ids and a request id per call, 100 callers and "
            "1 caller. producer-perf sends records of the size of our event JSON (as the seeding "
            "measured it) to a 3-partition topic, acks=all.\n"
            "- Freshness: loadgen issues CreateUser on schedule (open loop) and measures from the "
            "answer until GetUser returns the user: *position* passes the returned position (the "
            "service waits until it is applied), *poll* calls GetUser "
            "without it every 1 ms. Kafka's `EndToEndLatency` sends one record at a time and "
            "times its consumption (acks=all), on a 1-partition topic of the same broker.\n"
            "- Catch-up: N events produced straight to a fresh topic, then a service on a fresh "
            "group starts; loadgen reads the applied positions from Redis every 5 ms (\"applying\": "
            "from the first applied batch to the last; \"from start\": from process start) and then "
            "waits for GetProgress' total lag 0 (the group's committed offsets). Then "
            f"{fmt_num((self.r.get('lg-create-mem') or {}).get('ok'))} CreateUser calls with request ids "
            "(100 callers) on that read model, for Redis' memory per user created as clients create them.\n"
            "- The Go peer: see section 8.\n"
        )

        # ---- 1 reads
        L.append("## 1. Reads: GetUser vs Redis GET, and the gRPC ceiling\n")
        L.append(self.table(reads_rows, show_c=True))
        L.append(
            f"\nGetUser / raw GET: loadgen {fmt_num(self.ratio(self.rps('lg-get'), raw_get))}×, "
            f"ghz {fmt_num(self.ratio(self.rps('ghz-get'), raw_get))}×. "
            f"GetUser / Health/Check (same tool): loadgen "
            f"{fmt_num(self.ratio(self.rps('lg-get'), self.rps('lg-health')))}×, ghz "
            f"{fmt_num(self.ratio(self.rps('ghz-get'), self.rps('ghz-health')))}×.\n"
        )
        self.chart(
            L,
            "reads-throughput",
            bars(
                "Reads: requests/s (50 callers)",
                "requests/s",
                [(lbl, [self.rps(n)]) for lbl, n, _ in reads_rows],
                [("req/s", PALETTE["service"])],
            ),
        )
        self.chart(
            L,
            "reads-latency",
            bars(
                "Reads: latency (ms)",
                "ms",
                [(lbl, [self.lat(n, "p50"), self.lat(n, "p99"), self.lat(n, "p999")]) for lbl, n, _ in reads_rows],
                [("p50", PALETTE["p50"]), ("p99", PALETTE["p99"]), ("p99.9", PALETTE["p999"])],
                refs=[(5, "p99 target 5 ms")],
            ),
        )

        L.append("### Diagnostic: the Redis client alone\n")
        L.append(
            "The same GETs (50 callers, same keys) straight from loadgen to Redis through the clients "
            "the service can use — a bb8 pool of 16 multiplexed connections, which PINGs every connection "
            "it hands out (`test_on_check_out`, on by default; `REDIS_CLIENT=pool`), the pool without that "
            "PING, and one multiplexed connection shared by all callers (`REDIS_CLIENT=shared`, the default; "
            "it pipelines concurrent commands).\n"
        )
        client_rows = [
            ("bb8 pool, PING on checkout (`REDIS_CLIENT=pool`)", "redis-client-pool", "service"),
            ("bb8 pool, no checkout PING", "redis-client-pool-no-check", "service2"),
            ("one multiplexed connection (`REDIS_CLIENT=shared`)", "redis-client-multiplexed", "raw"),
        ]
        L.append(self.table(client_rows))
        L.append(
            "\nHere \"client CPU\" is the Redis client library's own cost (loadgen does nothing else).\n"
        )
        self.chart(
            L,
            "redis-client",
            bars(
                "Redis GET through the service's client library: requests/s",
                "requests/s",
                [(lbl, [self.rps(n)]) for lbl, n, _ in client_rows]
                + [("redis-benchmark GET (raw)", [raw_get])],
                [("req/s", PALETTE["service"])],
            ),
        )

        # ---- 2 writes
        L.append("## 2. Writes: CreateUser vs Kafka's producer perf test\n")
        L.append(self.table(write_rows, show_c=True))
        rs = (self.steps.get("kafka-perf") or {}).get("record_size", "?")
        L.append(
            f"\nRecord size {rs} bytes (our events' average JSON). CreateUser / producer-perf: loadgen "
            f"{fmt_num(self.ratio(self.rps('lg-create'), raw_prod))}×, ghz "
            f"{fmt_num(self.ratio(self.rps('ghz-create'), raw_prod))}×. producer-perf pipelines "
            "one producer's batches; CreateUser answers each call only after its own acknowledgement.\n"
        )
        self.chart(
            L,
            "writes-throughput",
            bars(
                "Writes: records/s",
                "records/s",
                [(lbl, [self.rps(n)]) for lbl, n, _ in write_rows],
                [("records/s", PALETTE["service"])],
            ),
        )
        self.chart(
            L,
            "writes-latency",
            bars(
                "Writes: latency (ms)",
                "ms",
                [(lbl, [self.lat(n, "p50"), self.lat(n, "p99"), self.lat(n, "p999")]) for lbl, n, _ in write_rows],
                [("p50", PALETTE["p50"]), ("p99", PALETTE["p99"]), ("p99.9", PALETTE["p999"])],
                refs=[(10, "10 ms")],
            ),
        )

        # ---- 2b shared client
        L.append("### `REDIS_CLIENT=shared` (default) vs `REDIS_CLIENT=pool`\n")
        if any(r.get(n) for n in OPTIONAL):
            L.append(
                "The same loadgen runs on a second instance with `REDIS_CLIENT=pool` (a bb8 pool of "
                "16 multiplexed connections, PING on checkout) over A's topic and read model, "
                "its projector off: A's projector applies its events, so A's CPU over the step is "
                "added to its service CPU.\n"
            )
            shared_rows = [
                ("GetUser, shared (default)", "lg-get", "service"),
                ("GetUser, pool", "lg-get-pool", "service2"),
                ("CreateUser 100 callers, shared (default)", "lg-create", "service"),
                ("CreateUser 100 callers, pool", "lg-create-pool", "service2"),
                ("CreateUser 1 caller, shared (default)", "lg-create-single", "service"),
                ("CreateUser 1 caller, pool", "lg-create-single-pool", "service2"),
            ]
            L.append(self.table(shared_rows))
            L.append("")
            self.chart(
                L,
                "redis-client-service",
                bars(
                    "GetUser and CreateUser (loadgen): shared (default) vs pool Redis client",
                    "requests/s",
                    [
                        ("GetUser, 50 callers", [self.rps("lg-get"), self.rps("lg-get-pool")]),
                        ("CreateUser, 100 callers", [self.rps("lg-create"), self.rps("lg-create-pool")]),
                        ("CreateUser, 1 caller", [self.rps("lg-create-single"), self.rps("lg-create-single-pool")]),
                    ],
                    [("shared (default)", PALETTE["service"]), ("pool", PALETTE["ceiling"])],
                ),
            )
        else:
            L.append(
                "Not measured in this run: it predates `REDIS_CLIENT`.\n"
            )

        # ---- 3 freshness
        L.append(f"## 3. Freshness at {fmt_num(self.a.fresh_rate)} creates/s\n")
        L.append("| | creates/s | p50 ms | p99 ms | p99.9 ms | max ms | CreateUser p99 ms | not readable | GetUser calls |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for lbl, d in (("service, GetUser with position", fresh), ("service, GetUser polled every 1 ms", fresh_poll)):
            if not d:
                L.append(f"| {lbl} | — | | | | | | | |")
                continue
            f = d["freshness_ms"]
            L.append(
                f"| {lbl} | {fmt_num(d.get('achieved_rate'))} | {fmt_num(f['p50'])} | {fmt_num(f['p99'])} | "
                f"{fmt_num(f['p999'])} | {fmt_num(f['max'])} | {fmt_num(d['create_latency_ms']['p99'])} | "
                f"{d.get('not_seen', 0)} | {d.get('get_calls', 0):,} |"
            )
        k = r.get("kafka-e2e")
        if k:
            f = k["latency_ms"]
            L.append(
                f"| Kafka EndToEndLatency, acks=all, one at a time | — | {fmt_num(f['p50'])} | {fmt_num(f['p99'])} | "
                f"{fmt_num(f['p999'])} | — | | | |"
            )
        L.append(
            "\nThe service's figure starts at CreateUser's answer (the produce is already acknowledged) "
            "and ends when GetUser returns the user; Kafka's starts before the send and ends at the "
            "consumer, and its percentiles are whole milliseconds.\n"
        )
        rows = []
        for lbl, d in (("position", fresh), ("poll 1 ms", fresh_poll)):
            if d:
                f = d["freshness_ms"]
                rows.append((f"service, {lbl}", [f["p50"], f["p99"], f["max"]]))
        if k:
            rows.append(("Kafka e2e (p99.9 as max)", [k["latency_ms"]["p50"], k["latency_ms"]["p99"], k["latency_ms"]["p999"]]))
        self.chart(
            L,
            "freshness",
            bars(
                "Freshness: create answered → readable (ms)",
                "ms",
                rows,
                [("p50", PALETTE["p50"]), ("p99", PALETTE["p99"]), ("max", PALETTE["max"])],
                refs=[(25, "p99 target 25 ms")],
            ),
        )

        # ---- 4 catch-up
        L.append("## 4. Catch-up: a new projector over a backlog\n")
        if catch:
            prod = r.get("catchup-produce") or {}
            L.append("| | |\n|---|---|")
            L.append(f"| events in the topic (3 partitions) | {catch['events']:,} |")
            L.append(f"| produced by loadgen at | {fmt_num(prod.get('rps'))} events/s |")
            L.append(f"| service SERVING after | {catch['t_serving_s']:.2f} s |")
            L.append(f"| first batch applied after | {catch['t_first_applied_s']:.2f} s |")
            L.append(f"| everything applied after | {catch['t_applied_s']:.2f} s |")
            lag0 = catch.get("t_lag0_s")
            L.append(f"| GetProgress total lag 0 after | {'—' if lag0 is None else f'{lag0:.2f} s'} |")
            L.append(f"| **projector rate (applying)** | **{fmt_num(catch.get('rate_applying'))} events/s** |")
            L.append(f"| projector rate from process start | {fmt_num(catch.get('rate_from_start'))} events/s |")
            L.append(f"| redis-benchmark SET, 50 clients, -P 16 (raw) | {fmt_num(raw_set)} SET/s |")
            L.append(
                f"| projector / raw SET | {fmt_num(self.ratio(catch.get('rate_applying'), raw_set))}× |"
            )
            cpu = self.steps.get("catchup", {}).get("svc_cpu_s")
            if cpu is not None:
                L.append(f"| service CPU during catch-up | {cpu:.2f} s = {cpu / catch['events'] * 1e6:.1f} µs/event |")
            L.append("")
            self.chart(
                L,
                "catchup",
                bars(
                    "Catch-up: events (or SETs) per second",
                    "per second",
                    [
                        ("projector, applying", [catch.get("rate_applying")]),
                        ("projector, from process start", [catch.get("rate_from_start")]),
                        ("redis-benchmark SET -P 16 (raw)", [raw_set]),
                    ],
                    [("per s", PALETTE["service"])],
                    refs=[(50000, "target 50k/s")],
                ),
            )
            if len(catch.get("samples", [])) > 2:
                self.chart(
                    L,
                    "catchup-progress",
                    line(
                        "Catch-up: events applied to Redis",
                        "seconds since the service started",
                        "events",
                        [(0.0, 0)] + [(t / 1000.0, n) for t, n in catch["samples"]],
                    ),
                )

        # ---- 5 memory
        L.append("## 5. Memory\n")
        L.append("| service | phase | RSS at end MiB | peak RSS in phase MiB |\n|---|---|---|---|")
        for m in self.mem:
            L.append(
                f"| {m['svc_tag']} | {m['phase']} | {m['rss_kb'] / MIB:.1f} | {m['hwm_kb'] / MIB:.1f} |"
            )
        L.append(
            "\nService A served steps 1–3 (plus the seeding), S the `REDIS_CLIENT=pool` runs, B the "
            "catch-up and D the flood; \"idle\" is after the instance became "
            "SERVING (A's two seconds after). Peaks are per phase.\n"
        )
        self.chart(
            L,
            "memory",
            bars(
                "Service memory (MiB)",
                "MiB",
                [(f"{m['svc_tag']}: {m['phase']}", [m["rss_kb"] / MIB, m["hwm_kb"] / MIB]) for m in self.mem],
                [("RSS at end", PALETTE["idle"]), ("peak in phase", PALETTE["peak"])],
                refs=[(64, "64 MiB"), (256, "256 MiB")],
            ),
        )

        # ---- 6 cpu
        L.append("## 6. CPU per request\n")
        L.append(
            "| step | calls | service µs/call | Redis µs/call | Kafka µs/call | client CPU s | wall s | Redis commands per call |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for name in (
            "ghz-health", "lg-health", "ghz-get", "lg-get", "redis-get", "redis-client-pool",
            "redis-client-pool-no-check", "redis-client-multiplexed", "ghz-create", "lg-create",
            "lg-create-single", "kafka-perf", "lg-get-pool", "lg-create-pool",
            "lg-create-single-pool", "lg-fresh-position", "lg-fresh-poll", "catchup", "lg-create-mem",
            "redis-set",
        ) + tuple(f"peer-{s}-{k}" for s in PEER_SETTINGS for k in PEER_STEPS):
            d, m = r.get(name), self.steps.get(name)
            if not d or not m:
                continue
            n = d.get("count") or d.get("creates_ok") or d.get("events")
            if not n:
                continue

            def per(who):
                v = m.get(f"{who}_cpu_s")
                return "—" if v is None else f"{v / n * 1e6:.1f}"

            # The peer's rows: its process's CPU in the service's column.
            svc = per("svc") if not name.startswith(("redis-", "kafka-")) else "—"
            cmds = m.get("redis_commands") or {}
            top = sorted(cmds.items(), key=lambda kv: -kv[1])
            cs = ", ".join(f"{k.upper()} {v / n:.2f}" for k, v in top if v / n >= 0.01) or "—"
            L.append(
                f"| {name} | {n:,} | {svc} | {per('redis')} | {per('kafka')} | "
                f"{m.get('client_cpu_s', 0):.2f} | {m['wall_s']:.1f} | {cs} |"
            )
        L.append(
            "\nRedis commands per call come from `INFO commandstats` before and after the step (any other "
            "client of that Redis would count too). "
            "The freshness rows count one call per create (each also makes one or more GetUser calls). "
            f"A client whose CPU seconds approach the wall time × {e.get('nproc', '?')} CPUs is saturating "
            "the machine itself, not the service.\n"
        )

        # ---- 7 untrusted callers
        L.append("## 7. Untrusted callers: waiting calls and a flood\n")
        L.append(
            "Instances C and D run without a projector, so a position in their topics is never applied: "
            "every GetUser waiting on it waits out the service's bound (`MAX_POSITION_WAIT`) and the codes "
            "it answers are counted below, though the caller's deadline is an hour. Redis' command rate comes from "
            "`INFO commandstats` around each step (the whole server: any other client counts too).\n"
        )
        L.append("| step | waiting calls | Redis commands/s | calls answered | codes |\n|---|---|---|---|---|")
        for name, label in (
            ("waiters-0", "0 (idle)"),
            ("lg-waiters-one", "1"),
            ("lg-waiters-many", str(n_many)),
            ("lg-get", "— (the GetUser load of section 1)"),
        ):
            d = r.get(name) or {}
            rate = self.waiting.get(name)
            codes = ", ".join(f"{k} {v:,}" for k, v in (d.get("errors") or {}).items()) or "—"
            L.append(f"| {name} | {label} | {fmt_num(rate)} | {d.get('count', '—')} | {codes} |")
        fl = r.get("lg-flood")
        fm = self.steps.get("lg-flood") or {}
        if fl:
            errs = fl.get("errors") or {}
            L.append(
                f"\n**Flood**: {fm.get('callers', '?')} callers in a closed loop against instance D, whose "
                f"budget is {fm.get('limit', '?')} concurrent calls (`MAX_CONCURRENT_CALLS`), every call "
                f"waiting on the position above: {fl.get('count', 0):,} answers in {fl.get('elapsed_s', 0):.1f} s "
                f"({', '.join(f'{k} {v:,}' for k, v in errs.items())}); latency over all answers, the "
                f"refused included: p50 {fmt_num(self.lat('lg-flood', 'p50'))} ms, p99 "
                f"{fmt_num(self.lat('lg-flood', 'p99'))} ms. Service CPU {fm.get('svc_cpu_s', '—')} s; its memory is in section 5 "
                "(D: idle, flood, after-flood).\n"
            )

        # ---- 8 the Go peer
        self.peer_section(L)

        # ---- 9 tracing
        self.tracing_section(L)

        # ---- the hand-written analysis: linked, never copied in
        rel = self.notes_rel(out_path)
        L.append("## Analysis\n")
        L.append(
            "Everything above was measured by this run. A hand-written analysis of earlier, named runs "
            "(where the time goes, what was changed, why targets are missed) is kept apart in "
            f"[benchmarks-notes.md]({rel}); this run did not measure it.\n"
        )

        with open(out_path, "w") as f:
            f.write("\n".join(L).rstrip() + "\n")
        for name, fig in self.charts.items():
            save_svg(fig, os.path.join(chart_dir, name + ".svg"))
        with open(os.path.join(self.run_dir, "results.json"), "w") as f:
            json.dump(
                {
                    "mode": self.a.mode,
                    "env": self.env,
                    "targets": T,
                    "problems": self.problems,
                    "steps": {k: {kk: vv for kk, vv in (v or {}).items() if kk != "_kind"} for k, v in self.r.items()},
                    "mem": self.mem,
                    "redis_mem_per_user": self.peer_mem(),
                },
                f,
                indent=1,
                default=str,
            )
        return T

    def tracing_section(self, L):
        """What tracing costs: the same calls with spans exported and without."""
        L.append("## 9. Tracing: what it costs per call\n")
        ran = [n for n in TRACE_STEPS if self.r.get(n)]
        if not ran:
            L.append("Not measured in this run: it predates the tracing step.\n")
            return
        L.append(
            "Instances over A's topic, consumer group and read model, one at a time: without tracing, then "
            "with `OTEL_EXPORTER_OTLP_ENDPOINT` set to a Jaeger all-in-one of this run (in memory, on the "
            "same machine). \"on\" traces every call (the SDK's default sampler, parent-based always-on): "
            "the server span, and for a create the publish span and the projector's process span, batched "
            "and exported over OTLP/gRPC. \"sampled\" keeps 1 % of the calls that arrive without a trace "
            "(`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.01`). Service CPU includes the "
            "projector (each instance runs one); Jaeger's CPU is its own column, the cost of receiving the "
            "spans, paid by the backend, not the service. Each round runs off, on, sampled, so the rounds "
            "show the machine's noise.\n"
        )
        L.append(
            "| step | calls | req/s | p50 ms | p99 ms | service CPU µs/call | Jaeger CPU µs/call |\n"
            "|---|---|---|---|---|---|---|"
        )
        for n in ran:
            d = self.r[n]
            lm = d.get("latency_ms", {})
            L.append(
                f"| {n} | {d.get('count') or 0:,} | {fmt_num(d.get('rps'))} | {fmt_num(lm.get('p50'))} | "
                f"{fmt_num(lm.get('p99'))} | {fmt_num(self.cpu_per_req(n))} | "
                f"{fmt_num(self.cpu_per_req(n, 'jaeger'))} |"
            )
        L.append("")
        L.append(
            "| calls | mode | service CPU µs/call | vs off | req/s | vs off | p50 ms | vs off |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for k, label in TRACE_KINDS.items():
            agg = {}
            for t in TRACE_MODES:
                names = [f"trace-{t}-{r}-{k}" for r in TRACE_ROUNDS if self.r.get(f"trace-{t}-{r}-{k}")]
                calls = sum(self.r[n].get("count") or 0 for n in names)
                cpu = sum((self.steps[n].get("svc_cpu_s") or 0) for n in names)
                rps = [self.rps(n) for n in names if self.rps(n)]
                p50 = [self.lat(n, "p50") for n in names if self.lat(n, "p50") is not None]
                agg[t] = (
                    cpu / calls * 1e6 if calls else None,
                    sum(rps) / len(rps) if rps else None,
                    sum(p50) / len(p50) if p50 else None,
                )

            def vs(i, t):
                a, b = agg["off"][i], agg[t][i]
                if t == "off" or a is None or b is None or not a:
                    return ""
                return f"{(b - a) / a * 100:+.0f} %"

            for t in TRACE_MODES:
                c, r_, l_ = agg[t]
                L.append(
                    f"| {label if t == 'off' else ''} | {t} | {fmt_num(c)} | {vs(0, t)} | {fmt_num(r_)} | "
                    f"{vs(1, t)} | {fmt_num(l_)} | {vs(2, t)} |"
                )
        L.append(
            "\nThe second table sums the rounds: CPU is all rounds' service CPU over all their calls; "
            "req/s and p50 are the rounds' means.\n"
        )

    def chart(self, L, name, fig):
        self.charts[name] = fig
        L.append(f"![{name}](bench/{name}.svg)\n")

    def table(self, rows, show_c=False):
        L = [
            "| | calls | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | service CPU µs/call | client CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lbl, name, _ in rows:
            d, m = self.r.get(name), self.steps.get(name) or {}
            if not d:
                L.append(f"| {lbl} | — | | | | | | | | |")
                continue
            lm = d.get("latency_ms", {})
            errs = d.get("errors") or {}
            es = ", ".join(f"{k} {v}" for k, v in errs.items()) or "0"
            if d.get("cut_at_end"):
                es += f" ({d['cut_at_end']} cut by ghz at the end, left out)"
            c = self.cpu_per_req(name) if not name.startswith(("redis-", "kafka-")) else None
            L.append(
                f"| {lbl} | {d.get('count') or 0:,} | {fmt_num(d.get('rps'))} | {fmt_num(lm.get('p50'))} | "
                f"{fmt_num(lm.get('p99'))} | {fmt_num(lm.get('p999'))} | {fmt_num(lm.get('max'))} | {es} | "
                f"{fmt_num(c)} | {m.get('client_cpu_s', 0):.2f} |"
            )
        return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--mode", choices=["full", "smoke"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--connections", default="4")
    ap.add_argument("--fresh-rate", type=float, default=2000)
    ap.add_argument("--wall-s", default="")
    ap.add_argument("--service-env", default="")
    ap.add_argument("--failed", action="append", default=[])
    a = ap.parse_args()
    rep = Report(a)
    targets = rep.write()
    # A short summary for the terminal (and CI logs).
    print(f"[bench] report: {a.out}")
    for t in targets:
        print(f"[bench]   {t[2].replace('**', ''):<9} {t[0]}: {t[1]}")
    if rep.problems:
        for p in rep.problems:
            print(f"[bench] problem: {p}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
