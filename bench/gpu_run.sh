#!/usr/bin/env bash
# Issue 6, part 6: everything a GPU session measures, in one call (docs/gpu.md).
# Writes each script's output to $OUT (or bench/results/gpu when OUT is unset). Each step has its own time limit,
# so one slow or failing script leaves the others' figures intact.
# Usage: bash bench/gpu_run.sh [tests medium medium_autocast profile multijob multijob_fused multijob_compiled multijob_packed
# packed_attention job_optimizer grouped memory_model generate compiled_generate compiled_train fused_chain].
# Default: medium_autocast multijob_fused profile tests medium multijob generate (the new figures first, re-measures
# last); the others need calls of their own (the medium shape compiles for minutes). Needs CUDA, and peft and
# transformers as docs/gpu.md, "Setup", installs them. Run from the repository's root. Exit status 1 if a part failed
# or was skipped; their lines are printed last.
# GPU_DEADLINE_S=<seconds>: no part runs past that many seconds from the start (parts cut short or skipped), so a call
# of several parts ends inside the device tool's limit with every finished part's figures.
set -u
deadline=${GPU_DEADLINE_S:-100000}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.:bench PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    | tee -a "$out/machine.txt"

run() {  # run <seconds> <log name> <command...>
    local limit=$1 log=$2 left=$((deadline - SECONDS))
    shift 2
    if [ "$left" -lt 15 ]; then
        echo "$log: skipped, ${left} s left before GPU_DEADLINE_S" | tee -a "$out/machine.txt"
        return
    fi
    [ "$limit" -gt "$((left - 10))" ] && limit=$((left - 10))  # (the kill comes 10 s after the limit)
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$log" 2>&1
    echo "$log: exit $? in $((SECONDS - start)) s" | tee -a "$out/machine.txt"
}

parts=("$@")
[ $# -eq 0 ] && parts=(medium_autocast multijob_fused profile tests medium multijob generate)
for part in "${parts[@]}"; do
    case $part in
        # -v: a line per test as it ends, kept if the limit cuts the run; test_cuda_paths.py (the re-bounded compiled
        # bf16 steps) first, then the other files in the order given
        # (--continue-on-collection-errors: a file that cannot import, e.g. a package the image lacks, fails alone)
        tests) run 300 gpu_tests.log python3 -m pytest -v -ra --durations=0 -p no:cacheprovider \
            --continue-on-collection-errors \
            tests/gpu/test_cuda_paths.py $(ls tests/gpu/test_*.py | grep -v test_cuda_paths) ;;
        medium) run 120 gpu_medium.jsonl python3 bench/gpu_medium.py --repeats 5 ;;
        medium_autocast) run 120 gpu_medium_autocast.jsonl python3 bench/gpu_medium.py --repeats 5 --autocast bf16 ;;
        profile) run 110 profile_medium.log python3 bench/profile_step.py --shape medium --steps 2 ;;
        multijob) run 110 multijob_medium.jsonl python3 bench/multijob_speedup.py --shape medium --jobs 4 8 --repeats 5 ;;
        multijob_fused) run 110 multijob_fused_medium.jsonl python3 bench/multijob_speedup.py --shape medium --jobs 4 8 \
            --repeats 5 --optim adamw_torch_fused --compare-layouts ;;
        multijob_compiled) run 400 multijob_compiled_medium.jsonl python3 bench/multijob_speedup.py --shape medium \
            --jobs 4 8 --repeats 5 --optim adamw_torch_fused --compile --compile-mode reduce-overhead --compare-layouts ;;
        multijob_packed) run 300 multijob_packed_medium.jsonl python3 bench/multijob_speedup.py --shape medium \
            --jobs 4 --repeats 5 --optim adamw_torch_fused --compile --packed ;;
        packed_attention) run 150 packed_attention_medium.jsonl python3 bench/packed_attention.py --shape medium \
            --repeats 5 --chunk-tokens 128 512 2048 ;;
        job_optimizer) run 60 job_optimizer_medium.jsonl python3 bench/job_optimizer.py --shapes medium --repeats 200 ;;
        grouped) run 30 grouped_cuda.jsonl python3 bench/grouped_products.py --repeats 20 ;;
        memory_model) run 150 memory_model_medium.jsonl python3 bench/memory_model_error.py --shape medium \
            --kinds lora mixlora dynmole ;;
        generate) run 60 generate_medium.jsonl python3 bench/generate_vs_base.py --shape medium --new-tokens 32 --repeats 2 \
            --impls peft_lora mixlora dynmole ;;
        compiled_train) run 400 compile_medium.jsonl python3 bench/compile_step.py --shape medium --repeats 5 \
            --impls peft_lora mixlora dynmole_sharp ;;
        fused_chain) run 60 fused_chain_medium.jsonl python3 bench/fused_chain.py --shape medium
            # flat routers: the medium shape's initialised ones select 4.5 of 8 experts, too few for the dense path
            run 300 dynmole_fused_medium.jsonl python3 bench/dynmole_vs_mixlora.py --shape medium --repeats 3 \
                --init-router-scale 0 ;;
        compiled_generate) run 300 generate_compiled_medium.jsonl python3 bench/generate_vs_base.py --shape medium \
            --new-tokens 32 --repeats 3 --compile --impls mixlora dynmole ;;
        *) echo "unknown part: $part" >&2 ;;
    esac
done
cat "$out"/*.jsonl "$out"/profile_medium.log 2>/dev/null | grep '^{' \
    | grep -v '"name": "train_step"\|"name": "generate"\|"name": "multijob_step"'
if [ -f "$out/gpu_tests.log" ]; then  # failed tests (the summary, or the -v lines of a run cut short), the counts
    grep -E '^(FAILED|ERROR) | (FAILED|ERROR) +\[|[0-9]+ (passed|failed|skipped|errors?)|no tests ran' \
        "$out/gpu_tests.log" | tail -n 20
fi
if grep -E ': (exit [1-9]|skipped)' "$out/machine.txt"; then  # last, so the output's tail shows them
    exit 1
fi
