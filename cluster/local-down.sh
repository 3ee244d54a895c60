#!/usr/bin/env bash
# Stop exactly the Ray cluster that cluster/local-up.sh recorded in $RAY_FT_CLUSTER_DIR/cluster.env,
# and verify that none of its processes is left. Other Ray clusters on this machine are not touched
# (this is why it does not run `ray stop`, which stops every Ray process of the machine).
#
# Usage: cluster/local-down.sh [--purge]
#   --purge   also delete the cluster's Ray temp dir (session logs) and the node logs in the state dir
#
# local-up.sh starts every node in its own process session; every process of a node (GCS, raylet,
# dashboard, agents, Ray workers) keeps that session id. Job drivers get sessions of their own, so the
# descendants of the recorded sessions are stopped as well.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${RAY_FT_CLUSTER_DIR:-$REPO/outputs/cluster}"
STATE_FILE="$STATE_DIR/cluster.env"
GRACE_S="${RAY_FT_CLUSTER_STOP_GRACE:-10}"   # seconds between SIGTERM and SIGKILL, per stop phase

log() { printf '[local-down] %s\n' "$*"; }
die() { printf '[local-down] error: %s\n' "$*" >&2; exit "${2:-1}"; }

PURGE=0
for arg in "$@"; do
    case "$arg" in
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (usage: local-down.sh [--purge])" 2 ;;
    esac
done
[[ "$GRACE_S" =~ ^[0-9]+$ ]] || die "RAY_FT_CLUSTER_STOP_GRACE must be a whole number of seconds" 2
[[ -f "$STATE_FILE" ]] || die "no cluster recorded in $STATE_FILE (set RAY_FT_CLUSTER_DIR to the dir local-up.sh used)"

state_value() { sed -n "s/^$1=\"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$STATE_FILE" | tail -n 1; }
RECORDED_SESSIONS="$(state_value RAY_FT_CLUSTER_SESSIONS)"
TEMP_DIR="$(state_value RAY_FT_CLUSTER_TEMP_DIR)"
[[ -n "$TEMP_DIR" ]] || die "$STATE_FILE records no RAY_FT_CLUSTER_TEMP_DIR"

# Keep only the recorded sessions that still hold a process of this cluster (one naming its temp dir),
# so a stale state file can never stop processes that merely reuse a session number.
SESSIONS=""
for sid in $RECORDED_SESSIONS; do
    if ps -eo sid=,args= | awk -v sid="$sid" -v dir="$TEMP_DIR/" '$1 == sid && index($0, dir) { found = 1 } END { exit !found }'; then
        SESSIONS="$SESSIONS $sid"
    fi
done

# Live (non-zombie) processes in SESSIONS, plus all their descendants.
cluster_pids() {
    [[ -n "${SESSIONS// /}" ]] || return 0
    ps -eo pid=,ppid=,sid=,stat= | awk -v sessions="$SESSIONS" '
        BEGIN { n = split(sessions, s, " "); for (i = 1; i <= n; i++) want[s[i]] = 1 }
        $4 ~ /^Z/ { next }
        { pid[NR] = $1; ppid[NR] = $2; if ($3 in want) mine[$1] = 1 }
        END {
            do {
                changed = 0
                for (i in pid) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; changed = 1 }
            } while (changed)
            for (p in mine) print p
        }'
}

# The subset of the given pids that are still alive (zombies count as gone).
alive() {
    [[ $# -gt 0 ]] || return 0
    ps -o pid=,stat= -p "$(IFS=,; echo "$*")" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true
}

declare -A SEEN=()
scan() {
    local p
    for p in $(cluster_pids); do SEEN[$p]=1; done
}

# The seen, still-alive processes of one stop phase: raylets | others | gcs_server.
phase_pids() {
    local wanted="$1"
    alive "${!SEEN[@]}" | while read -r p; do
        comm="$(ps -o comm= -p "$p" 2>/dev/null || true)"
        case "$wanted:$comm" in
        raylets:raylet | gcs:gcs_server) echo "$p" ;;
        others:raylet | others:gcs_server | raylets:* | gcs:*) ;;
        others:*) echo "$p" ;;
        esac
    done
}

# Like `ray stop`: raylets first (they stop their workers and agents), then every other process, the
# GCS last; SIGTERM, up to GRACE_S seconds per phase, then SIGKILL.
stop_phase() {
    local phase="$1" deadline=$((SECONDS + GRACE_S)) pids
    pids="$(phase_pids "$phase")"
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    while :; do
        sleep 0.5
        scan  # processes started during the shutdown are stopped too
        pids="$(phase_pids "$phase")"
        [[ -z "$pids" ]] && return 0
        if ((SECONDS >= deadline)); then
            log "$phase still running after ${GRACE_S}s, sending SIGKILL: $(echo $pids)"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
            return 0
        fi
    done
}

scan
if [[ ${#SEEN[@]} -eq 0 ]]; then
    log "no process of the cluster in $STATE_FILE is running"
else
    log "stopping ${#SEEN[@]} processes (sessions:${SESSIONS})"
    for phase in raylets others gcs others; do
        stop_phase "$phase"
    done
    scan
    left="$(alive "${!SEEN[@]}")"
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        sleep 1
        left="$(alive "${!SEEN[@]}")"
    fi
    [[ -z "$left" ]] || die "processes of the cluster are still running: $(echo $left)"
fi

left="$(cluster_pids)"
[[ -z "$left" ]] || die "processes of the cluster are still running: $(echo $left)"
rm -f "$STATE_FILE"
if ((PURGE)); then
    rm -rf "$TEMP_DIR"
    rm -f "$STATE_DIR"/head.log "$STATE_DIR"/worker*.log
    rmdir "$STATE_DIR" 2>/dev/null || true
fi
log "cluster stopped; no process of it is left"
