#!/usr/bin/env python3
"""Runs one benchmark step and records what it cost, for scripts/bench.

    measure.py --metrics FILE --name NAME --run-dir DIR [--timeout S]
               [--pid svc=PID[,PID] --pid redis=PID ...] [--meta KEY=VALUE ...]
               [--redis HOST:PORT] -- CMD...

Runs CMD (stdout to DIR/NAME.out, stderr to DIR/NAME.err), killed after the
timeout. Appends one JSON line to the metrics file: exit code, wall time, the
CPU seconds (utime+stime from /proc/PID/stat) each named process used during
the step (summed when a name has several), the client's own CPU (the command
and its children, from rusage), the named processes' RSS after it, and with
--redis the calls per Redis command during the step (INFO commandstats). Exits with the command's code (124 on
timeout). Standard library only.
"""
import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        # rest[0] is field 3 (state); utime is field 14, stime 15.
        return (int(rest[11]) + int(rest[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def mem_kb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def redis_command_calls(addr):
    """Calls per command from Redis' INFO commandstats (a minimal RESP client)."""
    if not addr:
        return None
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            head, _, body = buf.partition(b"\r\n")
            size = int(head[1:])
            while len(body) < size:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                body += chunk
    except (OSError, ValueError):
        return None
    calls = {}
    for line in body[:size].decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            for kv in rest.split(","):
                k, _, v = kv.partition("=")
                if k == "calls":
                    calls[name] = int(v)
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--pid", action="append", default=[])
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--redis", default="", help="HOST:PORT: record Redis commands per step")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    # NAME=PID[,PID...]: CPU is summed over the pids, memory is the first's.
    pids = {}
    for p in a.pid:
        k, _, v = p.partition("=")
        ids = [int(x) for x in v.split(",") if x]
        if ids:
            pids[k] = ids

    def cpu_sum(ids):
        vals = [cpu_seconds(i) for i in ids]
        return None if any(x is None for x in vals) else sum(vals)

    before = {k: cpu_sum(v) for k, v in pids.items()}
    cmds0 = redis_command_calls(a.redis)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out_path = os.path.join(a.run_dir, a.name + ".out")
    err_path = os.path.join(a.run_dir, a.name + ".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
            err.write(f"\n[measure] killed after {a.timeout:.0f}s\n".encode())
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = {
        "type": "step",
        "name": a.name,
        "cmd": cmd,
        "rc": rc,
        "start": t0,
        "wall_s": round(wall, 3),
        "client_cpu_s": round(
            (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 3
        ),
    }
    for k, v in pids.items():
        after = cpu_sum(v)
        if before[k] is not None and after is not None:
            rec[f"{k}_cpu_s"] = round(after - before[k], 3)
        m = mem_kb(v[0])
        if m:
            rec[f"{k}_rss_kb"] = m.get("VmRSS")
            rec[f"{k}_hwm_kb"] = m.get("VmHWM")
    cmds1 = redis_command_calls(a.redis)
    if cmds0 is not None and cmds1 is not None:
        # Every client of this Redis counts, other users' too.
        rec["redis_commands"] = {
            k: v - cmds0.get(k, 0) for k, v in sorted(cmds1.items()) if v - cmds0.get(k, 0) > 0
        }
    for m in a.meta:
        k, _, v = m.partition("=")
        rec[k] = v
    with open(a.metrics, "a") as f:
        f.write(json.dumps(rec) + "\n")
    state = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"[bench]   {a.name}: {state} in {wall:.1f}s", file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
