"""Runs a command that prints one JSON object, and adds its peak resident set size.

    python3 bench/peak_rss.py OUT.json CMD [ARG...]

CMD's standard output goes to OUT.json; when CMD succeeds, "peak_rss_mib" (the largest
resident set size CMD reached, in MiB, from getrusage of the waited-for child) is added to the
object. Exits with CMD's exit code.
"""
import json
import resource
import subprocess
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, cmd = sys.argv[1], sys.argv[2:]
    with open(path, "w") as out:
        rc = subprocess.call(cmd, stdout=out)
    if rc == 0:
        with open(path) as f:
            d = json.load(f)
        d["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with open(path, "w") as f:
            json.dump(d, f)
    sys.exit(rc)


if __name__ == "__main__":
    main()
