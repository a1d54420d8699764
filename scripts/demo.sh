#!/usr/bin/env bash
# The demo behind `make demo`: train -> export -> serve -> query -> report -> stop.
# Run from the repository root after `make install` (make demo does both).
set -euo pipefail
PY=.venv/bin/python
OUT=artifacts/demo
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 train and export the default image model (digits-cnn, scikit-learn's load_digits)"
$PY -m training

step "2/6 train and export the fast text model (lang-transformer: language ID on generated sentences)"
$PY -m training.text --model transformer

step "3/6 sample images from the held-out test split"
$PY scripts/demo_samples.py "$OUT/samples"

PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
step "4/6 serve both models on $URL (log: $OUT/server.log)"
CLF_TEXT_MODEL=lang-transformer:latest setsid .venv/bin/bentoml serve service.service:Classifier --host 127.0.0.1 --port "$PORT" \
  >"$OUT/server.log" 2>&1 &
SERVER=$!
stop_server() {
  kill -TERM -- "-$SERVER" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
for i in $(seq 1 240); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] && break
  kill -0 "$SERVER" 2>/dev/null || { tail -20 "$OUT/server.log"; echo "server exited"; exit 1; }
  sleep 0.5
done
echo "ready: $(curl -s "$URL/v1/models" | head -c 200)..."

step "5/6 query"
S="$OUT/samples"
run() { echo "\$ $*" | sed "s#$URL#\$URL#g"; "$@"; echo; }
first=$(ls "$S"/digit-*.png | head -1)
run curl -s -F "image=@$first" "$URL/v1/classify/image"
args=(); for f in "$S"/digit-*.png; do args+=(-F "image=@$f"); done
run curl -s "${args[@]}" "$URL/v1/classify/image?top_k=2"
b64=$(base64 -w0 "$first")
echo "\$ curl -s -H 'Content-Type: application/json' -d '{\"images\": [\"<base64 of $(basename "$first")>\"]}' \$URL/v1/classify/image"
curl -s -H 'Content-Type: application/json' -d "{\"images\": [\"$b64\"]}" "$URL/v1/classify/image"; echo
echo "# bad input gets a 4xx with a reason, and the server keeps serving:"
run curl -s -w ' -> HTTP %{http_code}' -F "image=@$S/not-an-image.png" "$URL/v1/classify/image"
run curl -s -w ' -> HTTP %{http_code}' -F "photo=@$first" "$URL/v1/classify/image"
echo "# text:"
run curl -s -H 'Content-Type: application/json' -d '{"text": "Guten Morgen, wie geht es dir heute?"}' "$URL/v1/classify/text"
run curl -s -H 'Content-Type: application/json' \
  -d '{"texts": ["Dziekuje bardzo za pomoc", "Merci beaucoup pour votre aide", "Grazie mille per il vostro aiuto"]}' \
  "$URL/v1/classify/text?top_k=2"
run curl -s -w ' -> HTTP %{http_code}' -H 'Content-Type: application/json' -d '{"texts": ["   "]}' "$URL/v1/classify/text"

step "6/6 what /metrics counted"
curl -s "$URL/metrics" | grep -E '^clf_(predictions_total|rejected_inputs_total|batch_size_items_(count|sum)|inference_seconds_(count|sum)|model_info)' || true
curl -s "$URL/metrics" | grep -E '^bentoml_service_request_total.*classify' | cut -c1-160 || true
echo
echo "demo done; stopping the server"
