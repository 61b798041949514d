#!/usr/bin/env bash
# Stock-interpreter benchmark: `dynspec bench` (native and `dynspec run` alternated, medians, outputs checked equal)
# on unmodified distribution interpreters that happen to be installed. Prints one table row per program; a program
# that is not installed is skipped and says so. Usage: benches/stock.sh [N]   (N runs of each kind, default 5)
set -uo pipefail
cd "$(dirname "$0")/.."
N="${1:-5}"
DYNSPEC="${DYNSPEC:-target/release/dynspec}"
[ -x "$DYNSPEC" ] || cargo build --release --quiet || exit 1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Inputs: each workload runs 1.5-5 s natively on a 2-core VM (long enough that the fixed start-up cost of a few
# tens of milliseconds is not what is measured).
seq 1 20000000 > "$tmp/numbers"
cat > "$tmp/loop.tcl" <<'TCL'
set s 0
for {set i 0} {$i < 6000000} {incr i} { set s [expr {($s + $i * 7) % 1000003}] }
puts $s
TCL

row() { # name, command...
    local name="$1"; shift
    if ! command -v "$1" >/dev/null 2>&1; then
        printf '| %-10s | not installed |\n' "$name"
        return
    fi
    local out
    out="$("$DYNSPEC" bench -n "$N" -q -- "$@" 2>&1 | tail -1)"
    printf '| %-10s | %s |\n' "$name" "$out"
}

echo "| program    | result (native vs dynspec run, medians of $N) |"
echo "|---|---|"
row mawk mawk '{ s += $1 * 2; if ($1 % 7 == 0) c++ } END { print s, c }' "$tmp/numbers"
row perl perl -e 'my $s = 0; for my $i (1..40000000) { $s = ($s + $i * 7) % 1000003 } print "$s\n"'
row python3 python3 -c 's = 0
for i in range(12000000): s = (s + i * 7) % 1000003
print(s)'
row tclsh tclsh "$tmp/loop.tcl"
row bc bash -c 'echo "s=0; for (i=0; i<2000000; i++) s=(s+i*7)%1000003; s" | bc'
row jq jq -n 'reduce range(0; 4000000) as $i (0; (. + $i * 7) % 1000003)'
row sqlite3 sqlite3 :memory: 'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20000000) SELECT sum(x * 7 % 1000003) FROM c;'
