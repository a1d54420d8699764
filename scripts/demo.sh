#!/usr/bin/env bash
# The demo behind `make demo`: train -> export -> serve -> query -> report -> stop.
# Run from the repository root after `make install` (make demo does both).
set -euo pipefail
PY=.venv/bin/python
OUT=artifacts/demo
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/9 train and export the default image model (digits-cnn, scikit-learn's load_digits)"
$PY -m training
# The first version of a name becomes production by itself; a later one is promoted by hand
# (or by the retraining script). The demo serves what it just trained:
$PY -m modelstore promote digits-cnn:latest --reason "make demo"

step "2/9 train and export the fast text model (lang-transformer: language ID on generated sentences)"
$PY -m training.text --model transformer
$PY -m modelstore promote lang-transformer:latest --reason "make demo"
$PY -m modelstore list digits-cnn | head -6

step "3/9 sample images from the held-out test split"
$PY scripts/demo_samples.py "$OUT/samples"
LOG="$OUT/predictions.db"
rm -f "$LOG" "$LOG"-wal "$LOG"-shm "$OUT/drift_latest.json"
TOKEN=demo-feedback-token

PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
step "4/9 serve both models on $URL (log: $OUT/server.log, predictions: $LOG)"
CLF_IMAGE_MODEL=digits-cnn CLF_TEXT_MODEL=lang-transformer CLF_PREDICTION_LOG="$LOG" \
CLF_FEEDBACK_TOKEN=$TOKEN CLF_SLICE_KEYS="device=ios|android|web" setsid .venv/bin/bentoml serve service.service:Classifier --host 127.0.0.1 --port "$PORT" \
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

step "5/9 query"
S="$OUT/samples"
run() { echo "\$ $*" | sed "s#$URL#\$URL#g"; "$@"; echo; }
first=$(ls "$S"/digit-*.png | head -1)
run curl -s -H "X-Request-ID: demo-1" -H "X-Slices: device=web" -F "image=@$first" "$URL/v1/classify/image"
echo "# ground truth for that request, by its id (the token guards the route):"
run curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d "{\"request_id\": \"demo-1\", \"label\": \"$(basename "$first" .png | cut -d- -f2)\"}" "$URL/v1/feedback"
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

step "6/9 production traffic: 300 held-out digits from 'ios' devices, with their true labels as feedback"
$PY scripts/demo_traffic.py "$URL" --count 300 --device ios --token $TOKEN --since-file "$OUT/normal.since"
$PY -m monitoring slices --model digits-cnn --log "$LOG" --since 1h --min-count 20

step "7/9 a shifted batch (brighter, rotated scans from 'android' devices) and the drift report"
$PY -m monitoring drift --model digits-cnn --log "$LOG" --since "$(cat "$OUT/normal.since")" \
  --out "$OUT/drift-normal" | tail -2 || true
$PY scripts/demo_traffic.py "$URL" --count 200 --shift bright --device android --token $TOKEN \
  --since-file "$OUT/shift.since"
set +e
$PY -m monitoring drift --model digits-cnn --log "$LOG" --since "$(cat "$OUT/shift.since")" --out "$OUT/drift"
code=$?
set -e
echo "drift exit code: $code (0 = no drift, 1 = drifted, 2 = no report); HTML report: $OUT/drift/drift.html"

step "8/9 the data drifted: retrain on the labelled traffic, promote only if better, hot reload"
before=$(curl -s "$URL/v1/models" | $PY -c 'import json,sys; print(json.load(sys.stdin)["models"][0]["version"])')
set +e
$PY -m training.retrain --model digits-cnn --log "$LOG" --only-if-drifted --audit "$OUT/retrain-audit.jsonl" \
  2>&1 | grep -vE '^[0-9:]+ epoch ' | cut -c1-300
set -e
for _ in $(seq 1 20); do  # the workers check the production pointer every 2 s
  after=$(curl -s "$URL/v1/models" | $PY -c 'import json,sys; print(json.load(sys.stdin)["models"][0]["version"])')
  [ "$after" != "$before" ] && break; sleep 0.5
done
echo "served version before: digits-cnn:$before, now: digits-cnn:$after (no restart)"
echo "# 100 more shifted digits, none of them among the 200 the challenger saw:"
$PY scripts/demo_traffic.py "$URL" --count 100 --offset 200 --shift bright --device android
sleep 16  # the workers copy the latest drift scores into their gauges every 15 s

step "9/9 what /metrics counted"
curl -s "$URL/metrics" | grep -E '^clf_(predictions_total|rejected_inputs_total|batch_size_items_(count|sum)|inference_seconds_(count|sum)|model_info|ood_flagged_total|feedback_labels_total|model_reloads_total|drift_detected|drift_share)' || true
curl -s "$URL/metrics" | grep -E '^bentoml_service_request_total.*classify' | cut -c1-160 || true
echo
echo "demo done; stopping the server"
