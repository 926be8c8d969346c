#!/bin/sh
# The image's smoke test, run by its `smoke` stage as the image's user (uid 10001): the
# demo (generate, prefetch, attach with every tensor verified) and a controller on its
# embedded Redis with one prefetch through it, status, and a clean stop. Whatever it
# warmed is evicted on the way out: a build's /dev/shm may be the host's.
set -eu
models=$(mktemp -d)
serve_pid=""
cleanup() {
    [ -z "$serve_pid" ] || kill "$serve_pid" 2>/dev/null || true
    warmpool evict "$models/demo" --force > /dev/null 2>&1 || true
    warmpool evict "$models/tiny" --force > /dev/null 2>&1 || true
    rm -rf "$models"
}
trap cleanup EXIT
echo "as $(id -u):$(id -g), $(warmpool --version 2>/dev/null || true)"
warmpool generate "$models/demo" --preset "${DEMO_PRESET:-small}" --shards 2
warmpool prefetch "$models/demo"
warmpool attach "$models/demo" --verify
warmpool generate "$models/tiny" --preset tiny --shards 1 > /dev/null
# Metrics on any free port: a build may share the host's network.
WARMPOOL_METRICS_PORT=0 warmpool serve > "$models/serve.log" 2>&1 &
serve_pid=$!
i=0
until grep -q '"event": "serving"' "$models/serve.log"; do
    i=$((i + 1))
    if [ "$i" -gt 60 ] || ! kill -0 "$serve_pid" 2>/dev/null; then
        cat "$models/serve.log"; echo "the controller did not start"; exit 1
    fi
    sleep 1
done
warmpool prefetch "$models/tiny" --json | tee "$models/prefetch.json"
grep -q '"via": *"controller"' "$models/prefetch.json" \
    || { echo "the prefetch did not go through the controller"; exit 1; }
warmpool status
warmpool evict "$models/tiny" --force  # through the controller, whose registry holds it
kill -TERM "$serve_pid"
wait "$serve_pid" && status=0 || status=$?
serve_pid=""
[ "$status" -eq 0 ] || { cat "$models/serve.log"; echo "serve exited $status"; exit 1; }
echo "smoke test passed: demo verified, a prefetch through the controller, a clean stop"
