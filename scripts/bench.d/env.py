#!/usr/bin/env python3
"""Prints the machine and versions a benchmark ran on, as JSON (scripts/bench).

    env.py REDIS_HOST REDIS_PORT GHZ_PATH
"""
import datetime
import json
import os
import platform
import re
import subprocess
import sys


def run(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main():
    host, port, ghz = sys.argv[1:4]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lscpu = run("lscpu")
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    redis_info = run("redis-cli", "-h", host, "-p", port, "info", "server")
    redis_version = re.search(r"redis_version:(\S+)", redis_info)
    libs = os.path.join(
        os.environ.get("USER_SERVICE_HOME", os.path.expanduser("~/.cache/user-service")),
        "kafka",
        "libs",
    )
    kafka = "?"
    try:
        for name in os.listdir(libs):
            m = re.match(r"kafka_2\.13-(.+)\.jar$", name)
            if m:
                kafka = m.group(1)
    except OSError:
        pass
    ghz_stamp = os.path.join(os.path.dirname(ghz), ".ghz.version")
    try:
        ghz_version = open(ghz_stamp).read().strip().rsplit("@", 1)[-1]
    except OSError:
        ghz_version = run(ghz, "--version")
    commit = run("git", "-C", root, "rev-parse", "--short", "HEAD")
    dirty = run("git", "-C", root, "status", "--porcelain", "--untracked-files=no")
    print(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"
                ),
                "nproc": run("nproc"),
                "cpu_model": model.group(1).strip() if model else platform.processor(),
                "mem_gib": round(mem_kb / 1024 / 1024, 1),
                "kernel": platform.release(),
                "loadavg": open("/proc/loadavg").read().split()[:3],
                "loadavg_at": "start",
                "rustc": run("rustc", "--version"),
                "redis": redis_version.group(1) if redis_version else "?",
                "kafka": kafka,
                "java": run("java", "-version").splitlines()[0] if run("java", "-version") else "?",
                "ghz": ghz_version,
                "redis_benchmark": run("redis-benchmark", "--version"),
                "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
