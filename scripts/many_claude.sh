#!/usr/bin/env bash
# Launch N Claude Code print-mode sessions (`claude -p`) at once through a
# hivemind_trio proxy, each under its own agent name, and wait for them all.
#
#   scripts/many_claude.sh [-n N] [-u URL] [-a PREFIX] [-p PRIORITY] [-o DIR] [PROMPT]
#
#   -n N         sessions to start (default 3)
#   -u URL       the proxy (default $HIVEMIND_URL or http://127.0.0.1:8765)
#   -a PREFIX    agent names are PREFIX-1 .. PREFIX-N (default claude)
#   -p PRIORITY  x-hivemind-priority of every session: critical|high|normal|low
#                (default: none, the proxy's rules decide)
#   -o DIR       where each session's output goes, DIR/PREFIX-i.out (default: a new temp dir)
#   PROMPT       what each session is asked (default: a one-line greeting);
#                "{i}" and "{agent}" in it are replaced per session
#
# The key comes from your environment as usual (ANTHROPIC_API_KEY or
# ANTHROPIC_AUTH_TOKEN); the proxy forwards it untouched.  Each session gets
# ANTHROPIC_BASE_URL=URL and x-hivemind-agent / x-hivemind-priority through
# ANTHROPIC_CUSTOM_HEADERS (appended to any you already set); the proxy reads
# and strips those headers, they never reach the provider.  The claude binary
# is $CLAUDE, else `claude` on PATH.  Exit status: 0 when every session
# succeeded, else 1.  Watch them with `hivemind-trio status --url URL --watch`.
set -euo pipefail

n=3
url="${HIVEMIND_URL:-http://127.0.0.1:8765}"
prefix=claude
priority=""
outdir=""
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "n:u:a:p:o:h" opt; do
    case "$opt" in
        n) n="$OPTARG" ;;
        u) url="$OPTARG" ;;
        a) prefix="$OPTARG" ;;
        p) priority="$OPTARG" ;;
        o) outdir="$OPTARG" ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
prompt="${1:-Reply with a one-line greeting.}"

case "$n" in ''|*[!0-9]*) echo "many_claude.sh: -n needs a positive number, got '$n'" >&2; exit 2 ;; esac
if [ "$n" -lt 1 ]; then echo "many_claude.sh: -n needs a positive number, got '$n'" >&2; exit 2; fi
case "$priority" in ''|critical|high|normal|low|0|1|2|3) ;; *)
    echo "many_claude.sh: -p must be critical, high, normal or low, got '$priority'" >&2; exit 2 ;;
esac
claude="${CLAUDE:-$(command -v claude || true)}"
if [ -z "$claude" ]; then
    echo "many_claude.sh: no claude CLI (npm install -g @anthropic-ai/claude-code, or set CLAUDE=/path/to/claude)" >&2
    exit 2
fi
if [ -z "$outdir" ]; then outdir="$(mktemp -d "${TMPDIR:-/tmp}/many_claude.XXXXXX")"; fi
mkdir -p "$outdir"

pids=()
for i in $(seq 1 "$n"); do
    agent="$prefix-$i"
    headers="x-hivemind-agent: $agent"
    if [ -n "$priority" ]; then headers="$headers"$'\n'"x-hivemind-priority: $priority"; fi
    if [ -n "${ANTHROPIC_CUSTOM_HEADERS:-}" ]; then headers="$ANTHROPIC_CUSTOM_HEADERS"$'\n'"$headers"; fi
    p="${prompt//\{i\}/$i}"
    p="${p//\{agent\}/$agent}"
    ANTHROPIC_BASE_URL="$url" ANTHROPIC_CUSTOM_HEADERS="$headers" \
        "$claude" -p "$p" </dev/null >"$outdir/$agent.out" 2>&1 &
    pids+=("$!")
    echo "started $agent (pid $!) -> $outdir/$agent.out"
done

failed=0
for i in $(seq 1 "$n"); do
    agent="$prefix-$i"
    if wait "${pids[$((i - 1))]}"; then
        echo "$agent: ok"
    else
        echo "$agent: exit status $? (see $outdir/$agent.out)"
        failed=1
    fi
done
exit "$failed"
