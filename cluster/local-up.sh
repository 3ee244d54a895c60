#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head node (GCS, dashboard, Jobs API) and
# RAY_FT_WORKER_NODES worker nodes, each its own raylet with its own ports, started with `ray start`.
#
# Usage: cluster/local-up.sh            (settings below come from environment variables)
#
# Token authentication is always on (RAY_AUTH_MODE=token). The token comes from RAY_AUTH_TOKEN,
# else the file RAY_AUTH_TOKEN_PATH (created if missing), else ~/.ray/auth_token (created if missing).
#
# The state file $RAY_FT_CLUSTER_DIR/cluster.env records the addresses and the process sessions of
# this cluster; `source` it to point `ray job submit`, `ray-ft submit` and `ray status` at the cluster,
# and stop exactly this cluster with cluster/local-down.sh.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY_FT_RAY:-}" && -x "$REPO/.venv/bin/ray" ]]; then
    RAY_FT_RAY="$REPO/.venv/bin/ray"
fi
RAY="${RAY_FT_RAY:-ray}"                                      # the `ray` executable
STATE_DIR="${RAY_FT_CLUSTER_DIR:-$REPO/outputs/cluster}"      # state file + node logs
GCS_PORT="${RAY_FT_GCS_PORT:-6379}"                           # head node GCS port
DASHBOARD_HOST="${RAY_FT_DASHBOARD_HOST:-127.0.0.1}"          # dashboard + Jobs API bind address
DASHBOARD_PORT="${RAY_FT_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${RAY_FT_HEAD_CPUS:-2}"                            # logical CPUs (may exceed cores)
WORKER_CPUS="${RAY_FT_WORKER_CPUS:-2}"                        # logical CPUs per worker node
WORKER_NODES="${RAY_FT_WORKER_NODES:-1}"
PORT_BASE="${RAY_FT_PORT_BASE:-20000}"                        # node i uses PORT_BASE + 200*i ... +199
OBJECT_STORE_MB="${RAY_FT_OBJECT_STORE_MB:-256}"              # per node
RAY_TEMP_DIR="${RAY_FT_RAY_TEMP_DIR:-/tmp/ray-ft-$GCS_PORT}"  # Ray sessions and logs: TEMP/h (head), TEMP/wN
TIMEOUT_S="${RAY_FT_CLUSTER_TIMEOUT:-300}"                    # wait this long for the nodes to come up
STATE_FILE="$STATE_DIR/cluster.env"

log() { printf '[local-up] %s\n' "$*"; }
die() { printf '[local-up] error: %s\n' "$*" >&2; exit 2; }

for name in GCS_PORT DASHBOARD_PORT HEAD_CPUS WORKER_CPUS WORKER_NODES PORT_BASE OBJECT_STORE_MB TIMEOUT_S; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '${!name}'"
done
((WORKER_NODES >= 1)) || die "RAY_FT_WORKER_NODES must be >= 1 (a multi-node cluster), got $WORKER_NODES"
((OBJECT_STORE_MB >= 80)) || die "RAY_FT_OBJECT_STORE_MB must be >= 80 (Ray's minimum object store)"
((PORT_BASE + 200 * (WORKER_NODES + 1) <= 65535)) || die "RAY_FT_PORT_BASE=$PORT_BASE leaves no room for the node ports"
[[ "$RAY_TEMP_DIR" == /* ]] || die "RAY_FT_RAY_TEMP_DIR must be an absolute path, got '$RAY_TEMP_DIR'"
# Ray puts Unix sockets under <temp dir>/session_<timestamp>_<pid>/sockets/; Linux caps such paths at 107 bytes.
((${#RAY_TEMP_DIR} <= 36)) || die "RAY_FT_RAY_TEMP_DIR '$RAY_TEMP_DIR' is longer than 36 characters (socket paths would overflow)"
command -v "$RAY" >/dev/null || die "no ray executable '$RAY' (set RAY_FT_RAY)"
command -v setsid >/dev/null || die "setsid (util-linux) is required"
RAY_BIN_DIR="$(cd "$(dirname "$(command -v "$RAY")")" && pwd)"
PYTHON="$RAY_BIN_DIR/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

if [[ -f "$STATE_FILE" ]]; then
    die "$STATE_FILE exists: a cluster was started from $STATE_DIR; stop it with cluster/local-down.sh first"
fi
mkdir -p "$STATE_DIR" "$RAY_TEMP_DIR"

# ---------------------------------------------------------------- token authentication (never disabled)
export RAY_AUTH_MODE=token
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    TOKEN_SOURCE="the RAY_AUTH_TOKEN environment variable"
    unset RAY_AUTH_TOKEN_PATH
else
    TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$TOKEN_PATH" ]]; then
        mkdir -p "$(dirname "$TOKEN_PATH")"
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_PATH")
        log "generated a new authentication token in $TOKEN_PATH"
    fi
    export RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"
    TOKEN_SOURCE="$TOKEN_PATH"
fi

# Jobs run `python -m ray_ft.cli` / `ray-ft`: the nodes (and so the job drivers) see this interpreter first.
export PATH="$RAY_BIN_DIR:$PATH"
# Processes of this cluster that look the cluster up (Ray Train's helpers use the State API) must find this
# one even when other Ray clusters run on the machine.
export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="${RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS:-0}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# Ports of node i (0 = head): PORT_BASE + 200*i + offset.
node_port_flags() {
    local base=$((PORT_BASE + 200 * $1))
    echo "--node-manager-port=$base --object-manager-port=$((base + 1))" \
        "--dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))" \
        "--metrics-export-port=$((base + 4)) --runtime-env-agent-port=$((base + 5))" \
        "--min-worker-port=$((base + 100)) --max-worker-port=$((base + 199))"
}

# A GET on the Jobs/State API with the token; prints the JSON body.
api_get() {
    "$PYTHON" - "http://$DASHBOARD_HOST:$DASHBOARD_PORT$1" <<'EOF'
import os, sys, urllib.request
token = os.environ.get("RAY_AUTH_TOKEN") or open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
req = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, timeout=10) as resp:
    sys.stdout.write(resp.read().decode())
EOF
}

alive_nodes() {
    api_get "/api/v0/nodes?limit=1000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE" 2>/dev/null |
        "$PYTHON" -c 'import json, sys; print(len(json.load(sys.stdin)["data"]["result"]["result"]))' 2>/dev/null || echo 0
}

SESSIONS=()
# The state is rewritten after every node start, so local-down.sh can stop whatever got started even
# when a later step fails.
#
# Starts `ray start ARGS...` in a new session (so every process of the node, including the workers its
# raylet spawns, carries that session id) and records the session id.
start_node() {
    local name="$1"
    shift
    setsid "$RAY" start "$@" >"$STATE_DIR/$name.log" 2>&1 &
    local sid=$!
    SESSIONS+=("$sid")
    if ! wait "$sid"; then
        tail -n 30 "$STATE_DIR/$name.log" >&2
        write_state
        die "ray start for the $name node failed (log: $STATE_DIR/$name.log); cluster/local-down.sh cleans up"
    fi
}

GCS_ADDRESS=""
write_state() {
    local tmp="$STATE_FILE.tmp"
    {
        echo "# Ray cluster started by cluster/local-up.sh on $(date -Is)."
        echo "# 'set -a; source $STATE_FILE; set +a' points ray / ray-ft commands at it."
        echo "RAY_ADDRESS=${GCS_ADDRESS:-127.0.0.1:$GCS_PORT}"
        echo "RAY_API_SERVER_ADDRESS=http://$DASHBOARD_HOST:$DASHBOARD_PORT"
        echo "RAY_AUTH_MODE=token"
        [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
        echo "RAY_FT_CLUSTER_SESSIONS=\"${SESSIONS[*]}\""
        echo "RAY_FT_CLUSTER_NODES=$((WORKER_NODES + 1))"
        echo "RAY_FT_CLUSTER_TEMP_DIR=$RAY_TEMP_DIR"
    } >"$tmp"
    mv "$tmp" "$STATE_FILE"
}
# ---------------------------------------------------------------- head node
log "starting the head node: GCS port $GCS_PORT, dashboard http://$DASHBOARD_HOST:$DASHBOARD_PORT, $HEAD_CPUS CPUs"
# shellcheck disable=SC2046
start_node head --head --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" \
    --include-dashboard=true --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port=$((PORT_BASE + 6)) $(node_port_flags 0) \
    --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --temp-dir="$RAY_TEMP_DIR/h" --disable-usage-stats
GCS_ADDRESS="$(cat "$RAY_TEMP_DIR/h/ray_current_cluster" 2>/dev/null || echo "127.0.0.1:$GCS_PORT")"
write_state

deadline=$((SECONDS + TIMEOUT_S))
until api_get /api/version >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the Jobs API at http://$DASHBOARD_HOST:$DASHBOARD_PORT did not answer in ${TIMEOUT_S}s (log: $STATE_DIR/head.log)"
    sleep 1
done

# ---------------------------------------------------------------- worker nodes
# Each node gets its own temp dir: nodes sharing one would share the runtime-env cache, and one node
# replacing a job's unpacked working dir would pull it from under a driver running on another.
for ((i = 1; i <= WORKER_NODES; i++)); do
    log "starting worker node $i: $WORKER_CPUS CPUs, ports $((PORT_BASE + 200 * i))-$((PORT_BASE + 200 * i + 199))"
    # shellcheck disable=SC2046
    start_node "worker$i" --address="$GCS_ADDRESS" --num-cpus="$WORKER_CPUS" $(node_port_flags "$i") \
        --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --temp-dir="$RAY_TEMP_DIR/w$i" --disable-usage-stats
    write_state
done

want=$((WORKER_NODES + 1))
until [[ "$(alive_nodes)" == "$want" ]]; do
    ((SECONDS < deadline)) || die "only $(alive_nodes) of $want nodes are alive after ${TIMEOUT_S}s (logs: $STATE_DIR/*.log)"
    sleep 1
done

log "cluster up: $want nodes alive, $((HEAD_CPUS + WORKER_NODES * WORKER_CPUS)) logical CPUs"
log "  GCS address:  $GCS_ADDRESS"
log "  Jobs API:     http://$DASHBOARD_HOST:$DASHBOARD_PORT  (token: $TOKEN_SOURCE)"
log "  state file:   $STATE_FILE"
log "  use it:       set -a; source $STATE_FILE; set +a; ray-ft submit jobs/lora.yaml output_dir=/shared/run"
log "  stop it:      RAY_FT_CLUSTER_DIR=$STATE_DIR cluster/local-down.sh"
