#!/usr/bin/env python3
"""Turns the runs of scripts/bench.sh (results.jsonl: one JSON object per run) into
bench/results/<date>.json (machine, settings, median/min/max of every metric, and the raw
runs) and bench/results/<date>.md (short tables).

Re-render the Markdown of an existing report (after changing this file):
    python3 bench/report.py --results bench/results/<date>.json --out bench/results/<date>
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402  (bench/check.py: the key ratios and the regression check)


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine():
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    distro = None
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    commit = sh("git", "rev-parse", "--short", "HEAD")
    dirty = bool(sh("git", "status", "--porcelain", "--untracked-files=no"))
    return {
        "nproc": int(sh("nproc") or os.cpu_count() or 0),
        "memory_gib": round(mem_kib / 1024 / 1024, 1) if mem_kib else None,
        "cpu_model": model,
        "kernel": platform.release(),
        "os": distro,
        "rustc": sh("rustc", "--version"),
        "commit": (commit + ("-dirty" if dirty else "")) if commit else None,
    }


def get(d, path):
    for p in path.split("."):
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


def stats(values):
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


# Metrics summarised per measure: name -> path in a run's result.
METRICS = {
    "lag": {
        "lag_p50_ms": "lag_ms.p50", "lag_p90_ms": "lag_ms.p90", "lag_p99_ms": "lag_ms.p99",
        "lag_max_ms": "lag_ms.max", "lag_missing": "lag_ms.missing",
        "mean_poll_ms": "lag_ms.mean_poll_ms",
        "writes_per_sec": "writes_per_sec", "wal_mb_per_sec": "wal_mb_per_sec",
        "cpu_secs_per_gb_wal": "archiver.cpu_secs_per_gb_wal",
        "cpu_share_of_one_core": "archiver.cpu_share_of_one_core",
        "peak_rss_mib": "archiver.peak_rss_mib",
        "segments_per_hour": "segments.per_hour",
        "objects_created_per_hour": "objects.created_per_hour",
        "write_requests_per_hour": "requests.write_requests_per_hour",
        "stored_over_wal": "segments.stored_over_wal",
    },
    "idle": {
        "new_objects": "idle.new_objects", "cpu_secs": "idle.cpu_secs",
        "seconds": "idle.seconds", "rss_mib": "idle.rss_kib",
    },
    "max": {
        "writes_per_sec": "writes_per_sec", "wal_mb_per_sec": "wal_mb_per_sec",
        "archiver_mb_per_sec": "archiver.throughput_mb_per_sec",
        "throughput_over_write_rate": "archiver.throughput_over_write_rate",
        "catch_up_secs": "archiver.catch_up_after_writes_secs",
        "cpu_secs_per_gb_wal": "archiver.cpu_secs_per_gb_wal",
        "cpu_share_of_one_core": "archiver.cpu_share_of_one_core",
        "peak_rss_mib": "archiver.peak_rss_mib",
        "segments_per_hour": "segments.per_hour",
        "objects_created_per_hour": "objects.created_per_hour",
        "write_requests_per_hour": "requests.write_requests_per_hour",
        "stored_over_wal": "segments.stored_over_wal",
        "wal_bytes": "wal_bytes",
    },
    "drain": {
        "writes_per_sec": "writes_per_sec", "wal_mb_per_sec": "wal_mb_per_sec",
        "drain_secs": "drain.secs", "drain_mb_per_sec": "drain.mb_per_sec",
        "drain_over_write_rate": "drain.over_write_rate",
        "drain_cpu_secs": "drain.cpu_secs", "settle_secs": "drain.settle_secs",
        "server_cpu_share": "drain.server_cpu_share",
        "cpu_secs_per_gb_wal": "archiver.cpu_secs_per_gb_wal",
        "peak_rss_mib": "archiver.peak_rss_mib",
        "wal_bytes": "wal_bytes",
    },
    "db-load": {"sst_bytes": "sst_bytes", "payload_bytes": "payload_bytes",
                "write_secs": "write_secs"},
    "first-base": {"secs": "secs"},
    "wal-writes": {"writes": "writes", "wal_bytes": "wal_bytes", "sst_bytes": "sst_bytes",
                   "writes_per_sec": "writes_per_sec"},
    "tidemark-restore": {
        "total_secs": "durations_ms.total", "plan_secs": "durations_ms.plan",
        "fetch_base_secs": "durations_ms.fetch_base", "fetch_wal_secs": "durations_ms.fetch_wal",
        "replay_secs": "durations_ms.replay",
        "fetch_and_replay_wal_secs": "durations_ms.fetch_and_replay_wal",
        "verify_secs": "durations_ms.verify", "commit_secs": "durations_ms.commit",
        "download_bytes": "download_bytes", "base_bytes": "base.bytes",
        "segment_bytes": "segments.planned_bytes", "segments": "segments.planned",
        "records_replayed": "replay.records_replayed", "wal_bytes": "replay.wal_bytes",
        "peak_rss_mib": "peak_rss_mib",
    },
    "tidemark-restore-unverified": {"total_secs": "durations_ms.total",
                                    "fetch_base_secs": "durations_ms.fetch_base",
                                    "fetch_and_replay_wal_secs": "durations_ms.fetch_and_replay_wal"},
    "first-open-unverified": {"open_secs": "open_secs"},
    "tidemark-restore-standard": {"total_secs": "durations_ms.total",
                                  "fetch_base_secs": "durations_ms.fetch_base",
                                  "verify_secs": "durations_ms.verify"},
    "replay-ceiling": {"apply_and_flush_secs": "apply_and_flush_secs", "apply_secs": "apply_secs",
                       "records_per_sec": "records_per_sec", "mb_per_sec": "mb_per_sec",
                       "records": "records", "record_bytes": "record_bytes"},
    "first-open": {"open_secs": "open_secs", "wal_bytes": "wal_bytes_before_open"},
    "plain-get": {"download_secs": "download_secs", "bytes": "bytes", "mb_per_sec": "mb_per_sec",
                  "objects": "objects"},
    "backup-engine-create": {"secs": "secs", "bytes": "bytes"},
    "backup-engine-restore": {"secs": "secs", "bytes": "bytes"},
    "backup-engine-open": {"open_secs": "open_secs"},
    "tarball-create": {"total_secs": "total_secs", "tarball_bytes": "tarball_bytes",
                       "checkpoint_bytes": "checkpoint_bytes", "pack_secs": "pack_secs",
                       "upload_secs": "upload_secs"},
    "tarball-restore": {"total_secs": "total_secs", "download_secs": "download_secs",
                        "unpack_secs": "unpack_secs", "open_secs": "open_secs",
                        "tarball_bytes": "tarball_bytes"},
    "base-full": {"bytes_uploaded": "bytes_uploaded", "bytes_total": "bytes_total",
                  "uploaded_share": "uploaded_share", "duration_ms": "duration_ms"},
    "base-after-flush": {"bytes_uploaded": "bytes_uploaded", "bytes_total": "bytes_total",
                         "uploaded_share": "uploaded_share", "duration_ms": "duration_ms"},
    "base-after-compaction": {"bytes_uploaded": "bytes_uploaded", "bytes_total": "bytes_total",
                              "uploaded_share": "uploaded_share", "duration_ms": "duration_ms"},
}
METRICS["drain-racing"] = METRICS["drain"]
MS_TO_S = {"tidemark-restore", "tidemark-restore-unverified", "tidemark-restore-standard"}


def summarise(runs):
    groups = OrderedDict()
    for r in runs:
        key = (r["measure"], json.dumps(r["config"], sort_keys=True))
        groups.setdefault(key, []).append(r)
    out = []
    for (measure, config), rs in groups.items():
        metrics = {}
        for name, path in METRICS.get(measure, {}).items():
            vals = [get(r["result"], path) for r in rs]
            if measure in MS_TO_S and name.endswith("_secs"):
                vals = [v / 1000 if isinstance(v, (int, float)) else v for v in vals]
            if name == "rss_mib":
                vals = [v / 1024 if isinstance(v, (int, float)) else v for v in vals]
            s = stats(vals)
            if s:
                metrics[name] = s
        extra = {}
        if measure == "idle":
            r = rs[0]["result"]
            extra = {"requests": get(r, "idle.requests"),
                     "replaced_objects": get(r, "idle.replaced_objects"),
                     "new_object_keys": get(r, "idle.new_object_keys")}
        out.append({"measure": measure, "config": json.loads(config), "runs": len(rs),
                    "load1": stats([r["load1"] for r in rs]), "metrics": metrics, **extra})
    return out


def find(summary, measure, **config):
    for s in summary:
        if s["measure"] == measure and all(s["config"].get(k) == v for k, v in config.items()):
            return s
    return None


def m(s, name, key="median"):
    if s is None or name not in s["metrics"]:
        return None
    return s["metrics"][name][key]


def num(v, digits=None):
    if v is None:
        return "–"
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def rng(s, name, scale=1.0, digits=None):
    """median (min–max) of a metric, scaled."""
    if s is None or name not in s["metrics"]:
        return "–"
    x = s["metrics"][name]
    if x["n"] == 1 or x["min"] == x["max"]:
        return num(x["median"] * scale, digits)
    return (f"{num(x['median'] * scale, digits)} ({num(x['min'] * scale, digits)}–"
            f"{num(x['max'] * scale, digits)})")


def load_note(summary, *measures):
    """The range of the 1-minute load average over the runs of these measures."""
    lo = [s["load1"]["min"] for s in summary if s["measure"] in measures and s["load1"]]
    hi = [s["load1"]["max"] for s in summary if s["measure"] in measures and s["load1"]]
    if not lo:
        return ""
    return f"Load average (1 min) when these runs started: {min(lo):.2f}–{max(hi):.2f}."


def mb(v):
    return None if v is None else v / 1e6


def previous_section(doc, previous_path):
    """The key ratios of this run beside those of the previous run of the same kind."""
    if previous_path is None:
        return ["## Key ratios", "", "No earlier run of the same kind to compare with.", ""]
    with open(previous_path) as f:
        prev = json.load(f)
    rows = check.compare(doc, prev)
    name = os.path.basename(previous_path)
    L = ["## Key ratios, beside the previous run", "",
         f"Each ratio divides a Tidemark figure by a baseline measured in the same run; the "
         f"previous run is {name} (commit {prev.get('machine', {}).get('commit')}). "
         f"`python3 bench/check.py` fails when one is worse by more than "
         f"{check.TOLERANCE * 100:.0f} %.", ""]
    L += [check.table(rows, name) if rows else "No ratio in common with the previous run.", ""]
    return L


def markdown(doc, previous_path=None):
    mc, summary, st = doc["machine"], doc["summary"], doc["settings"]
    L = []
    title = "Tidemark benchmark" + (" (quick smoke run: tiny sizes, not for quoting)" if doc["quick"] else "")
    L += [f"# {title}", ""]
    L += [f"- date: {doc['started']} – {doc['finished']}",
          f"- machine: {mc['nproc']} CPUs ({mc['cpu_model']}), {mc['memory_gib']} GiB memory, "
          f"kernel {mc['kernel']}, {mc['os']}",
          f"- build: {mc['rustc']}, commit {mc['commit']}, {doc['binaries']}",
          f"- load average (1/5/15 min) at start: {doc['load_start']}, at end: {doc['load_end']}",
          f"- S3 server: {doc['s3_server']} on 127.0.0.1 (loopback: no network latency, "
          f"server CPU shared with everything else)",
          f"- every figure: median (min–max) of {st.get('REPS', '?')} runs unless marked",
          ""]
    L += previous_section(doc, previous_path)

    # 1. Lag
    polls = {}
    for s in summary:
        if s["measure"] == "lag" and m(s, "mean_poll_ms") is not None:
            polls.setdefault(s["config"]["store"], []).append(m(s, "mean_poll_ms"))
    poll_txt = ", ".join(f"one look at the {k} store took {num(statistics.median(v))} ms"
                         for k, v in polls.items()) or "no polls recorded"
    L += ["## 1. Durable archive lag", "",
          f"Writer: batches of one put with a time marker, at a fixed rate, {st.get('LAG_SECONDS', '?')} s "
          "per run. Lag = commit → a segment holding the write is seen in the store (polled "
          "every 10 ms after an empty look; an upper bound by at most one poll: "
          f"{poll_txt}).", "",
          "| store | sync interval | writes/s | value | p50 ms | p99 ms | max ms | archiver CPU (% of a core) |",
          "|---|---|---|---|---|---|---|---|"]
    for s in [s for s in summary if s["measure"] == "lag"]:
        c = s["config"]
        L.append(f"| {c['store']} | {c['sync']} | {c['rate']:,} | {c['value']} B | "
                 f"{rng(s, 'lag_p50_ms', digits=0)} | {rng(s, 'lag_p99_ms', digits=0)} | "
                 f"{rng(s, 'lag_max_ms', digits=0)} | {rng(s, 'cpu_share_of_one_core', 100, 1)} |")
    L += ["", load_note(summary, "lag"), ""]

    # 2. Cost
    L += ["## 2. Archiver cost", "",
          "| run | store | sync | value | WAL MB/s | CPU s per GB WAL | CPU % of a core | peak RSS MiB | "
          "objects created/h | S3 write requests/h | stored / WAL bytes |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    lag_rates = [x["config"]["rate"] for x in summary if x["measure"] == "lag"]
    for s in summary:
        c = s["config"]
        if s["measure"] == "lag" and c.get("rate") == min(lag_rates):
            label = f"{c['rate']:,} writes/s"
        elif s["measure"] == "max":
            label = "as fast as possible"
        else:
            continue
        L.append(f"| {label} | {c['store']} | {c.get('sync', '1s')} | {c['value']} B | {rng(s, 'wal_mb_per_sec')} | "
                 f"{rng(s, 'cpu_secs_per_gb_wal')} | {rng(s, 'cpu_share_of_one_core', 100, 1)} | "
                 f"{rng(s, 'peak_rss_mib', digits=0)} | {rng(s, 'objects_created_per_hour', digits=0)} | "
                 f"{rng(s, 'write_requests_per_hour', digits=0)} | {rng(s, 'stored_over_wal', digits=3)} |")
    L.append("")
    maxes = [s for s in summary if s["measure"] == "max"]
    if maxes:
        L += ["As fast as the writer goes (one writer thread, batches of one put):", "",
              "| store | value | writer WAL MB/s | archiver MB/s | archiver / writer | catch-up after the writer stopped, s |",
              "|---|---|---|---|---|---|"]
        for s in maxes:
            c = s["config"]
            L.append(f"| {c['store']} | {c['value']} B | {rng(s, 'wal_mb_per_sec')} | "
                     f"{rng(s, 'archiver_mb_per_sec')} | {rng(s, 'throughput_over_write_rate', digits=2)} | "
                     f"{rng(s, 'catch_up_secs')} |")
        L += ["", load_note(summary, "max", "idle"), ""]
    intros = {
        "drain": "Drain: the archiver paused while the writer goes as fast as it can for "
                 f"{st.get('DRAIN_SECONDS', '?')} s, then resumed once the database's flushes and "
                 "compactions of the burst are done; the backlog's WAL over the seconds it takes "
                 "to ship it (the archiver has the CPU to itself, as the writer had):",
        "drain-racing": "Racing drain: the same, resumed as soon as the writer stops, so that "
                        "the archiver shares the CPU with the compactions of the burst:",
    }
    for measure, intro in intros.items():
        drains = [s for s in summary if s["measure"] == measure]
        if not drains:
            continue
        L += [intro, "",
              "| store | value | writer WAL MB/s | backlog MB | settle s | drain s | archiver MB/s | "
              "archiver / writer | archiver CPU s per GB WAL | S3 server's CPU, cores (with the bench's polls) | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in drains:
            c = s["config"]
            L.append(f"| {c['store']} | {c['value']} B | {rng(s, 'wal_mb_per_sec')} | "
                     f"{rng(s, 'wal_bytes', 1e-6, 0)} | {rng(s, 'settle_secs')} | {rng(s, 'drain_secs')} | "
                     f"{rng(s, 'drain_mb_per_sec')} | {rng(s, 'drain_over_write_rate', digits=2)} | "
                     f"{rng(s, 'cpu_secs_per_gb_wal')} | {rng(s, 'server_cpu_share', digits=2)} | "
                     f"{rng(s, 'peak_rss_mib', digits=0)} |")
        L += ["", load_note(summary, measure), ""]
    for s in [s for s in summary if s["measure"] == "idle"]:
        req = s.get("requests")
        req_txt = (", ".join(f"{k} {v}" for k, v in req.items()) or "none") if req is not None else "not counted (local store)"
        L.append(f"Idle ({s['config']['store']} store, {num(m(s, 'seconds'), 0)} s, one run): "
                 f"{num(m(s, 'new_objects'), 0)} new objects, replaced: "
                 f"{', '.join(s.get('replaced_objects') or []) or 'none'}; archiver CPU "
                 f"{num(m(s, 'cpu_secs'), 3)} s; store requests: {req_txt}.")
    L.append("")

    # 3. Restore
    cfg_s = find(summary, "db-load")
    if cfg_s:
        c = cfg_s["config"]
        tr = find(summary, "tidemark-restore")
        ww = find(summary, "wal-writes")
        L += ["## 3. Restore", "",
              f"Database: {c['keys']:,} keys × {c['value']} B values (about 2:1 compressible), "
              f"{num(mb(m(ww, 'sst_bytes')), 0)} MB of SST files when the base was restored; then "
              f"{c['wal_seconds']} s of writes at {c['wal_rate']:,}/s archived after the base: "
              f"{num(mb(m(ww, 'wal_bytes')), 0)} MB of WAL. Store: {c['store']}. "
              f"Base files {num(mb(m(tr, 'base_bytes')), 0)} MB, segments "
              f"{num(mb(m(tr, 'segment_bytes')), 0)} MB.", "",
              "| restore | seconds | MB moved | then first open, s | to a usable database, s |",
              "|---|---|---|---|---|"]
        fo = find(summary, "first-open")
        pg = find(summary, "plain-get")
        be = find(summary, "backup-engine-restore")
        beo = find(summary, "backup-engine-open")
        tb = find(summary, "tarball-restore")

        def usable(a, a_name, b, b_name):
            if m(a, a_name) is None or m(b, b_name) is None:
                return "–"
            return num(m(a, a_name) + m(b, b_name))

        L.append(f"| Tidemark (base + WAL, point in time, verified: the default `--verify quick`) | "
                 f"{rng(tr, 'total_secs')} | "
                 f"{num(mb(m(tr, 'download_bytes')), 0)} | {rng(fo, 'open_secs')} | "
                 f"{usable(tr, 'total_secs', fo, 'open_secs')} |")
        ts = find(summary, "tidemark-restore-standard")
        if ts:
            L.append(f"| Tidemark, `--verify standard` (every block of the base's tables read too) | "
                     f"{rng(ts, 'total_secs')} | {num(mb(m(tr, 'download_bytes')), 0)} | "
                     f"{rng(fo, 'open_secs')} (as the default's) | "
                     f"{usable(ts, 'total_secs', fo, 'open_secs')} |")
        tu = find(summary, "tidemark-restore-unverified")
        fu = find(summary, "first-open-unverified")
        L.append(f"| Tidemark, `--verify off` | {rng(tu, 'total_secs')} | "
                 f"{num(mb(m(tr, 'download_bytes')), 0)} | {rng(fu, 'open_secs')} | "
                 f"{usable(tu, 'total_secs', fu, 'open_secs')} |")
        L.append(f"| plain parallel GET of the same objects (8 at once) | {rng(pg, 'download_secs')} | "
                 f"{num(mb(m(pg, 'bytes')), 0)} | – | – |")
        L.append(f"| RocksDB BackupEngine, from a local directory | {rng(be, 'secs')} | "
                 f"{num(mb(m(be, 'bytes')), 0)} | {rng(beo, 'open_secs')} | "
                 f"{usable(be, 'secs', beo, 'open_secs')} |")
        L.append(f"| checkpoint tarball (tar \\| zstd): download + unpack | {rng(tb, 'total_secs')} | "
                 f"{num(mb(m(tb, 'tarball_bytes')), 0)} | {rng(tb, 'open_secs')} | "
                 f"{usable(tb, 'total_secs', tb, 'open_secs')} |")
        L += ["", load_note(summary, "tidemark-restore", "tidemark-restore-unverified", "plain-get",
                            "backup-engine-restore", "tarball-restore", "first-open"), ""]
        L += ["Tidemark restore by phase (the base download runs alongside the WAL download "
              "and replay):", "",
              "| plan | fetch base | fetch WAL | write WAL files | fetch + write WAL | verify | commit | total |",
              "|---|---|---|---|---|---|---|---|",
              "| " + " | ".join(rng(tr, n) for n in [
                  "plan_secs", "fetch_base_secs", "fetch_wal_secs", "replay_secs",
                  "fetch_and_replay_wal_secs", "verify_secs", "commit_secs", "total_secs"]) + " |", ""]
        if m(tr, "peak_rss_mib") is not None:
            L += [f"Peak RSS of the default restore: {rng(tr, 'peak_rss_mib', digits=0)} MiB for "
                  f"{num(mb(m(tr, 'wal_bytes')), 0)} MB of WAL (segments are read and the WAL "
                  "files written as streams: memory does not grow with the WAL).", ""]
        tc = find(summary, "tarball-create")
        bc = find(summary, "backup-engine-create")
        fb = find(summary, "first-base")
        L += [f"Backups, one run each: Tidemark's first base (all SST files uploaded) "
              f"{num(m(fb, 'secs'))} s; BackupEngine backup {num(m(bc, 'secs'))} s; checkpoint + "
              f"tar | zstd + upload {num(m(tc, 'total_secs'))} s (upload {num(m(tc, 'upload_secs'))} s, "
              f"{num(mb(m(tc, 'tarball_bytes')), 0)} MB).", ""]

        # 4. Replay
        rc = find(summary, "replay-ceiling")
        L += ["## 4. Replay on first open", ""]
        recs, wal = m(tr, "records_replayed"), m(tr, "wal_bytes")
        fo_s = m(fo, "open_secs")
        rate_open = recs / fo_s if recs and fo_s else None
        mbs_open = wal / 1e6 / fo_s if wal and fo_s else None
        L += ["| | seconds | records/s | MB/s |", "|---|---|---|---|",
              f"| first open of the restored database (RocksDB recovery of {num(recs, 0)} records, "
              f"{num(mb(wal), 0)} MB of WAL) | {rng(fo, 'open_secs')} | {num(rate_open, 0)} | {num(mbs_open)} |",
              f"| the same records written with the WAL disabled, then a flush (ceiling) | "
              f"{rng(rc, 'apply_and_flush_secs')} | {rng(rc, 'records_per_sec', digits=0)} | {rng(rc, 'mb_per_sec')} |",
              ""]

    # 5. Incremental
    bf = find(summary, "base-full")
    if bf:
        a = find(summary, "base-after-flush")
        b = find(summary, "base-after-compaction")
        frac = bf["config"]["fraction"]
        L += ["## 5. Incremental base backups", "",
              f"After {frac * 100:g}% of the keys were overwritten (random keys):", "",
              "| base | size MB | uploaded MB | uploaded share | mean uploaded share |",
              "|---|---|---|---|---|",
              f"| reference base (one run) | {num(mb(m(bf, 'bytes_total')), 0)} | "
              f"{num(mb(m(bf, 'bytes_uploaded')), 0)} | {rng(bf, 'uploaded_share', 100, 1)} % | – |",
              f"| right after the flush (before compactions) | {rng(a, 'bytes_total', 1e-6, 0)} | "
              f"{rng(a, 'bytes_uploaded', 1e-6, 1)} | {rng(a, 'uploaded_share', 100, 1)} % | "
              f"{num(m(a, 'uploaded_share', 'mean') * 100 if m(a, 'uploaded_share') is not None else None, 1)} % |",
              f"| after compactions settled | {rng(b, 'bytes_total', 1e-6, 0)} | "
              f"{rng(b, 'bytes_uploaded', 1e-6, 1)} | {rng(b, 'uploaded_share', 100, 1)} % | "
              f"{num(m(b, 'uploaded_share', 'mean') * 100 if m(b, 'uploaded_share') is not None else None, 1)} % |",
              "",
              "Each round changes another 1% and takes two bases: one right after the flush, one "
              "after the compactions it triggers (if any) have finished. A compaction rewrites "
              "every file its key range overlaps, so with random keys a round either uploads "
              "almost nothing new or a large share; the mean is the long-run cost.",
              "", load_note(summary, "base-full", "base-after-flush", "base-after-compaction"), ""]
    L += ["Raw runs and every metric: the JSON file beside this one.", ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True, help="path without extension")
    ap.add_argument("--started", default="")
    ap.add_argument("--finished", default="")
    ap.add_argument("--load-start", default="")
    ap.add_argument("--load-end", default="")
    ap.add_argument("--quick", default="0")
    ap.add_argument("--s3-server", default="")
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--binaries", default="release build")
    a = ap.parse_args()
    if a.results.endswith(".json"):
        # Re-render the Markdown of an existing report.
        with open(a.results) as f:
            doc = json.load(f)
        doc["summary"] = summarise(doc["runs"])
        doc.setdefault("binaries", "release build")
        with open(a.out + ".json", "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        with open(a.out + ".md", "w") as f:
            f.write(markdown(doc, previous(a.out + ".json", doc)))
        return
    with open(a.results) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    summary = summarise(runs)
    doc = {
        "started": a.started, "finished": a.finished, "quick": a.quick == "1",
        "machine": machine(), "load_start": a.load_start, "load_end": a.load_end,
        "s3_server": a.s3_server, "settings": json.loads(a.settings), "binaries": a.binaries,
        "summary": summary, "runs": runs,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(a.out + ".md", "w") as f:
        f.write(markdown(doc, previous(a.out + ".json", doc)))


def previous(path, doc):
    """The newest committed run of the same kind that finished before this one, or None."""
    found = check.newest_baseline(path, before=doc.get("finished"))
    return found


if __name__ == "__main__":
    main()
