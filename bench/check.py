#!/usr/bin/env python3
"""The benchmark's regression check: compares the key ratios of a results file with a
baseline and fails (exit 1) when one of them is worse by more than the tolerance (20 %).

Ratios, not absolute times, because the machine is shared and noisy: each ratio divides a
Tidemark figure by a baseline measured in the same run (the writer, a plain parallel GET,
RocksDB's own replay), so a loaded machine slows both sides.

    python3 bench/check.py bench/results/NEW.json                 # against the newest
                                                                   # committed run of the
                                                                   # same kind (quick or full)
    python3 bench/check.py bench/results/NEW.json --baseline bench/results/OLD.json

Exit status: 0 no ratio worse by more than the tolerance; 1 at least one is; 2 nothing to
compare (no baseline of the same kind, or no ratio present in both files).
"""

import argparse
import glob
import json
import os
import sys

TOLERANCE = 0.20


def _find(summary, measure, **config):
    for s in summary:
        if s["measure"] == measure and all(s["config"].get(k) == v for k, v in config.items()):
            return s
    return None


def _median(s, name):
    if s is None or name not in s.get("metrics", {}):
        return None
    return s["metrics"][name]["median"]


def ratios(doc):
    """The key ratios of one results document: name -> (value, higher_is_better, meaning)."""
    summary = doc.get("summary", [])
    out = {}
    # Per archiver run: (metric, name of the ratio, meaning), by measure.
    archiver_ratios = {
        "max": ("throughput_over_write_rate", "archiver / writer",
                "archiver MB/s over the writer's WAL MB/s, as fast as it goes"),
        "drain": ("drain_over_write_rate", "archiver drain / writer",
                  "MB/s shipping a paused archiver's backlog over the writer's WAL MB/s"),
        "drain-racing": ("drain_over_write_rate", "archiver racing drain / writer",
                         "the same, resumed while the burst's compactions still run"),
    }
    for s in summary:
        if s["measure"] not in archiver_ratios:
            continue
        measure = s["measure"]
        if measure == "drain" and "settle_secs" not in s.get("metrics", {}):
            # Runs before the drain waited for the database to settle raced its compactions.
            measure = "drain-racing"
        metric, name, meaning = archiver_ratios[measure]
        c = s["config"]
        v = _median(s, metric)
        if v is not None:
            out[f"{name} ({c['store']}, {c['value']} B)"] = (v, True, meaning)
    tr = _find(summary, "tidemark-restore")
    fo = _find(summary, "first-open")
    pg = _find(summary, "plain-get")
    rc = _find(summary, "replay-ceiling")
    restore, open_, get = (_median(tr, "total_secs"), _median(fo, "open_secs"),
                           _median(pg, "download_secs"))
    if None not in (restore, open_, get) and get + open_ > 0:
        out["restore / plain GET (to a usable database)"] = (
            (restore + open_) / (get + open_), False,
            "verified restore + first open over plain parallel GET + the same first open")
    fetch_base = _median(tr, "fetch_base_secs")
    if None not in (fetch_base, get) and get > 0:
        out["base download / plain GET"] = (
            fetch_base / get, False, "the restore's base fetch over the plain GET of everything")
    ceiling = _median(rc, "apply_and_flush_secs")
    if None not in (open_, ceiling) and ceiling > 0:
        out["first open / WAL-off ceiling"] = (
            open_ / ceiling, False, "RocksDB's recovery over writing the same records WAL-off")
    return out


def compare(current, baseline, tolerance=TOLERANCE):
    """Rows (name, baseline value, current value, change, regressed) for the ratios in both."""
    cur, base = ratios(current), ratios(baseline)
    rows = []
    for name, (value, higher_better, _) in cur.items():
        if name not in base:
            continue
        old = base[name][0]
        if old == 0:
            continue
        change = value / old - 1
        worse = -change if higher_better else change
        rows.append((name, old, value, change, worse > tolerance))
    return rows


def newest_baseline(current_path, before=None):
    """The newest committed results file of the same kind as the current one (finished
    before `before`, an ISO time, when given), or None."""
    with open(current_path) as f:
        quick = json.load(f).get("quick", False)
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = []
    for path in glob.glob(os.path.join(here, "results", "*.json")):
        if os.path.abspath(path) == os.path.abspath(current_path):
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        finished = doc.get("finished")
        if doc.get("quick", False) == quick and finished and (before is None or finished < before):
            candidates.append((doc["finished"], path))
    return max(candidates)[1] if candidates else None


def table(rows, baseline_name):
    lines = [f"| ratio | {baseline_name} | this run | change |", "|---|---|---|---|"]
    for name, old, new, change, regressed in rows:
        flag = " **worse by more than 20 %**" if regressed else ""
        lines.append(f"| {name} | {old:.2f} | {new:.2f} | {change * 100:+.0f} %{flag} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("current", help="results JSON of the run to check")
    ap.add_argument("--baseline", help="results JSON to compare with (default: the newest "
                    "committed run of the same kind)")
    a = ap.parse_args()
    baseline = a.baseline or newest_baseline(a.current)
    if baseline is None:
        print("bench check: no committed results of the same kind (quick or full) to compare "
              "with; commit this run's results first, or give --baseline FILE", file=sys.stderr)
        return 2
    with open(a.current) as f:
        current = json.load(f)
    with open(baseline) as f:
        base = json.load(f)
    rows = compare(current, base)
    if not rows:
        print(f"bench check: {a.current} and {baseline} have no ratio in common; nothing was "
              "compared", file=sys.stderr)
        return 2
    print(table(rows, os.path.basename(baseline)))
    bad = [r[0] for r in rows if r[4]]
    if bad:
        print(f"\nbench check: FAILED, worse by more than {TOLERANCE * 100:.0f} % than "
              f"{baseline}: {'; '.join(bad)}", file=sys.stderr)
        return 1
    print(f"\nbench check: {len(rows)} ratios within {TOLERANCE * 100:.0f} % of {baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
