#!/usr/bin/env bash
# A local Prefect server, a process worker and a Ray head, all on loopback: the production topology on one
# machine, for `pixart deploy`, the Prefect UI and scheduled runs.
#
#   deploy/start_local.sh          start all three (state and logs in $PIXART_STATE), print the exports to use
#   deploy/start_local.sh stop     stop what it started (only those processes)
#
# Settings (environment): PIXART_STATE (default .pixart-local/ in the repository), PIXART_BIN (the venv's bin/),
# PREFECT_PORT (4200), RAY_PORT (6379), RAY_NUM_CPUS (all), RAY_OBJECT_STORE_MB (Ray's default), PIXART_WORK_POOL
# (pixart-local). Relative paths are taken from the current directory, once, here.
set -euo pipefail

absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=$(absolute "${PIXART_STATE:-$REPO/.pixart-local}")
BIN=$(absolute "${PIXART_BIN:-$REPO/.venv/bin}")
PREFECT_PORT=${PREFECT_PORT:-4200}
RAY_PORT=${RAY_PORT:-6379}
POOL=${PIXART_WORK_POOL:-pixart-local}

export PREFECT_HOME=$STATE/prefect                   # its own database, apart from ~/.prefect
export PIXART_SERVER_HOME=$PREFECT_HOME              # where `pixart server` keeps the server's database and record
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_ENABLED=${PREFECT_UI_ENABLED:-true}
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
export RAY_AUTH_MODE=token                           # the head requires its token (~/.ray/auth_token); so do clients
export PIXART_HOME=$REPO                             # where the deployments' pull step finds the code

stop() {
    for name in worker ray; do                      # the worker first: no new flow run starts meanwhile
        [[ -f $STATE/$name.pid ]] || continue
        pid=$(cat "$STATE/$name.pid")
        # SIGINT is what each of them shuts down cleanly on (Ctrl-C); SIGKILL only if that did not work.
        for signal in INT TERM KILL; do
            kill -s "$signal" "$pid" 2>/dev/null || break
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break 2; sleep 0.5; done
        done
        echo "stopped $name (pid $pid)"
        rm -f "$STATE/$name.pid"
    done
    "$BIN/pixart" server stop
    if [[ -f $STATE/ray.tmpdir ]]; then rm -rf "$(cat "$STATE/ray.tmpdir")" "$STATE/ray.tmpdir"; fi
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: retry COMMAND once a second; fail naming WHAT and its log
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "error: $what did not come up within ${seconds}s; see $STATE/$what.log" >&2
    tail -n 20 "$STATE/$what.log" >&2 || true
    exit 1
}

if [[ ${1:-start} == stop ]]; then
    stop
    exit 0
fi
if "$BIN/pixart" server status >/dev/null 2>&1; then
    echo "already running (state in $STATE); '$0 stop' first" >&2
    exit 1
fi
mkdir -p "$STATE" "$PREFECT_HOME"
cd "$REPO"

# 1. Prefect server: the one `pixart` commands start, here on a fixed port (it waits until the server answers)
"$BIN/pixart" server start --port "$PREFECT_PORT" >/dev/null

# 2. Ray head (--block: it stays in the foreground of its pid, and takes its processes down when stopped). Its
#    own temp dir (short: Unix socket paths are limited) keeps its address out of /tmp/ray/ray_current_cluster,
#    where every later `ray.init()` on this machine would find it and try to join it.
ray_tmp=$(mktemp -d /tmp/pixart-ray-XXXXXX)
echo "$ray_tmp" >"$STATE/ray.tmpdir"
ray_args=()
if [[ -n ${RAY_NUM_CPUS:-} ]]; then ray_args+=(--num-cpus "$RAY_NUM_CPUS"); fi
if [[ -n ${RAY_OBJECT_STORE_MB:-} ]]; then ray_args+=(--object-store-memory $((RAY_OBJECT_STORE_MB * 1024 * 1024))); fi
"$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" --include-dashboard=false \
    --temp-dir="$ray_tmp" "${ray_args[@]}" >"$STATE/ray.log" 2>&1 &
echo $! >"$STATE/ray.pid"
wait_for ray 120 "$BIN/python" -c "import ray; ray.init(address='$RAY_ADDRESS', log_to_driver=False)"

# 3. Work pool and process worker (flow runs inherit PREFECT_API_URL, RAY_ADDRESS and PIXART_HOME)
"$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
"$BIN/prefect" worker start --pool "$POOL" --type process >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"
wait_for worker 60 grep -q "started" "$STATE/worker.log"

cat <<DONE
Prefect server  $PREFECT_API_URL (UI: http://127.0.0.1:$PREFECT_PORT; database and log in $PREFECT_HOME)
Ray head        $RAY_ADDRESS (logs under $ray_tmp)
worker          pool $POOL, logs in $STATE/worker.log

In your shell:
  export PREFECT_API_URL=$PREFECT_API_URL RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=token
  pixart deploy                                   # the deployments of prefect.yaml
  prefect deployment run 'pipeline/demo'          # or from the UI, with any config field overridden
Stop everything: $0 stop
DONE
