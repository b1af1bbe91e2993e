#!/usr/bin/env bash
# Keeps the layering of ARCHITECTURE.md true: the programs (archiver/src, restore-tool/src)
# never write to or delete from the store on their own, never build object keys from the
# layout's prefixes or document names, and never parse or encode repository documents. All
# of that is the format crate's (manifest/: `repo`, `lease`, `keys`, `model`).
#
# Only product code is checked: a file's `#[cfg(test)] mod … { … }` is skipped (tests may
# play another writer or a damaged store). A line that must break a rule says why at its end:
# `// layering: <reason>`.
#
# Exits non-zero and prints `file:line: rule: text` for each violation.
set -euo pipefail
cd "$(dirname "$0")/.."

dirs=(archiver/src restore-tool/src)
[ "$#" -gt 0 ] && dirs=("$@")

find "${dirs[@]}" -name '*.rs' -print0 | sort -z | xargs -0 awk '
  BEGIN {
    n = 0
    # Writes and deletes on the store: documents go through `Repository`, data objects
    # through its `write_segment`, `put_base_file` and `delete_unreferenced`.
    rule[++n] = "store write or delete outside the format crate (use a Repository method)"
    re[n] = "\\.(put|put_if_absent|put_if_match|put_file|put_file_paced|delete)\\("
    # Keys from the layout: only `manifest::keys` builds them.
    rule[++n] = "object key built from a layout prefix (use a manifest::keys function)"
    re[n] = "\"(wal|sst|bases|index|manifest)/|\\.seg\"|\"[^\"]*/files/"
    rule[++n] = "document key named outside the format crate (use a Repository method)"
    re[n] = "(tidemark|lease|latest|base)\\.json\""
    rule[++n] = "layout constant used outside the format crate (use a Repository or manifest::keys function)"
    re[n] = "keys::(CONFIG|LEASE|LATEST_HINT|[A-Z_]+_PREFIX)([^A-Z_]|$)|use .*keys::\\{.*(CONFIG|LEASE|LATEST_HINT|_PREFIX)[,}]"
    # Documents: only `model` parses and encodes them, only `repo` reads and writes them.
    rule[++n] = "repository document parsed or encoded outside the format crate (use a Repository method)"
    re[n] = "parse_document|to_document_bytes|serde_json::from_(slice|str|reader|value)"
    bad = 0
  }
  FNR == 1 { skip = 0; pending = 0 }
  {
    line = $0
    if (pending) {
      pending = 0
      if (line ~ /^(pub(\([a-z]+\))? )?mod [A-Za-z_0-9]+ \{$/) { skip = 1; next }
    }
    if (skip) { if (line ~ /^\}$/) skip = 0; next }
    if (line ~ /^#\[cfg\(test\)\]$/) { pending = 1; next }
    if (line ~ /\/\/ layering: [^ ]/) next
    code = line
    sub(/^[ \t]*\/\/.*/, "", code)   # comment lines
    for (i = 1; i <= n; i++) {
      if (code ~ re[i]) {
        printf "%s:%d: %s: %s\n", FILENAME, FNR, rule[i], line
        bad = 1
      }
    }
  }
  END { exit bad }
' || {
  echo "check-layering: the programs must go through the format crate (ARCHITECTURE.md, manifest)" >&2
  exit 1
}
