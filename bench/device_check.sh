#!/usr/bin/env bash
# The GPU check as one command: a GPU is lent now and then for 15 minutes, start-up
# included, so everything that needs one runs here in under 8 minutes, each stage under
# its own time limit, and a stage that fails or overruns leaves a line in the report
# instead of ending the run. See bench/README.md.
#
#   bench/device_check.sh          on the GPU machine, from anywhere in the repo
#   bench/device_check.sh --cpu    a rehearsal on CPU: tiny sizes, TRITON_INTERPRET=1
#                                  (DEVICE_CHECK_CPU=1 does the same)
#
# Writes report.md and one log per stage to $OUT (default outputs/device_check, which git
# ignores) and prints the report's summary table last. Exit status 0 when no stage failed.
#
# Environment: PYTHON (python3); LIMIT_CEILINGS, LIMIT_PYTEST, LIMIT_KERNELS, LIMIT_COMPILED,
# LIMIT_TILES, LIMIT_TRAIN (seconds per stage); INFONCE_ARGS, COMPILED_ARGS, TILES_ARGS,
# TRAIN_ARGS (replace the default arguments of bench/infonce.py in the kernels and compiled
# stages, bench/infonce_tiles.py and bench/gpu_train.py); WHEELS (.whl: wheels installed
# first, GPU only).
set -euo pipefail

cpu=${DEVICE_CHECK_CPU:-0}
for arg in "$@"; do
  case $arg in
    --cpu) cpu=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${OUT:-$repo/outputs/device_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}
# The package is not installed on the GPU machine: a link named after its import root makes
# `import biencoder.<...>` read this tree.
mkdir -p "$work/root"
ln -s "$repo" "$work/root/biencoder"
export PYTHONPATH="$work/root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started_at=$(date -u '+%Y-%m-%d %H:%M UTC')
script_args="$*"

if [[ $cpu == 1 ]]; then
  mode="CPU rehearsal (tiny sizes, TRITON_INTERPRET=1)"
  # The rehearsal checks that every stage runs, not how fast: one thread per process
  # keeps it quick where other jobs share the cores (oversubscribed OpenMP threads spin).
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  device=cpu
  infonce_args=(--isolate impl --impls naive triton inf_cl triton_recompute torch
    --sizes 32 --dims 16 --dtypes bf16 --problems in_batch hard_neg symmetric --repeats 1
    --fit-search --fit-max 64 --target-size 32)
  compiled_args=(--isolate impl --impls naive compiled --sizes 32 --dims 16 --dtypes bf16
    --problems in_batch --repeats 1)
  tiles_args=(--size 64 --dim 32 --repeats 1 --warmups 0)
  train_args=(--batch-sizes 8 16 --chunk-size 4 --chunk-tokens 32 --layers 1 --hidden 32
    --heads 4 --intermediate 64 --vocab-size 200 --seconds 1 --max-steps 2
    --query-words 2 4 --doc-words 4 8 --encode-texts 16 --encode-batch 8 --profile)
else
  mode="GPU"
  device=cuda
  # B=262,144 costs minutes per implementation: it is for a lease of its own. hard_neg
  # (N = 2B) told the same story as in_batch in the 2026-11-26 runs: INFONCE_ARGS adds it.
  infonce_args=(--impls naive triton inf_cl triton_recompute torch --sizes 16384 65536
    --dims 768 --dtypes bf16 --problems in_batch symmetric --repeats 2 --fit-search
    --fit-seconds 5 --target-size 16384)
  # torch.compile's first call outlasted the 42-58 s the kernels stage had left for it in
  # both runs of 2026-11-26: a stage of its own, one problem (dynamic shapes, so both sizes
  # share one compilation of the training graph and one of the no-grad graph).
  compiled_args=(--impls naive compiled --sizes 16384 65536 --dims 768 --dtypes bf16
    --problems in_batch --repeats 2)
  tiles_args=(--size 16384 --dim 768)
  # Steps of ~1-2 s at 4096 and ~5-8 s at 16384: one or a few timed steps each, then one
  # profiled and one counted step of ours; --budget cuts what would not fit.
  train_args=(--batch-sizes 4096 16384 --chunk-size 256 --chunk-tokens 32768 --seconds 5
    --encode-texts 4096 --profile ours ours_tokens)
fi
if [[ -n ${INFONCE_ARGS:-} ]]; then
  read -ra infonce_args <<<"$INFONCE_ARGS"
fi
if [[ -n ${COMPILED_ARGS:-} ]]; then
  read -ra compiled_args <<<"$COMPILED_ARGS"
fi
if [[ -n ${TILES_ARGS:-} ]]; then
  read -ra tiles_args <<<"$TILES_ARGS"
fi
if [[ -n ${TRAIN_ARGS:-} ]]; then
  read -ra train_args <<<"$TRAIN_ARGS"
fi
# Sized from the H200 runs of 2026-11-26 (bench/results/gpu_h200.md): ceilings took 5 s,
# pytest 117 s on 4 workers, tiles 24 s; kernels, compiled and train stop at their budget
# (the limit less 15 s, 15 s and 20 s: the driver's start, imports and report). With the
# 15 s of the wheels stage the limits add up to 480 s.
limit_ceilings=${LIMIT_CEILINGS:-20}
limit_pytest=${LIMIT_PYTEST:-130}
limit_kernels=${LIMIT_KERNELS:-75}
limit_compiled=${LIMIT_COMPILED:-75}
limit_tiles=${LIMIT_TILES:-30}
limit_train=${LIMIT_TRAIN:-135}

names=()
statuses=()
durations=()
results=()

# The summary table, one row per stage recorded so far.
summary_table() {
  echo "| stage | status | seconds | result |"
  echo "|---|---|---|---|"
  local i
  for i in "${!names[@]}"; do
    echo "| ${names[$i]} | ${statuses[$i]//|//} | ${durations[$i]} | ${results[$i]//|//} |"
  done
}

# Rewritten after every stage, so a run cut off from outside still leaves a report.
write_report() {
  {
    echo "# Device check"
    echo
    echo "- mode: $mode"
    echo "- started: $started_at; $SECONDS s so far"
    echo "- host: $(hostname); command: \`bench/device_check.sh $script_args\`"
    echo
    echo "## Summary"
    echo
    summary_table
    local i name
    for i in "${!names[@]}"; do
      name=${names[$i]}
      echo
      echo "## $name"
      echo
      if [[ -s $out/$name.md ]]; then
        # Each stage's own report starts at '#'; nested under this section.
        sed 's/^#/###/' "$out/$name.md"
      else
        echo "No report from this stage: ${statuses[$i]}."
        if [[ -s $out/$name.log ]]; then
          echo "Last lines of $name.log:"
          echo
          echo '```text'
          tail -n 20 "$out/$name.log"
          echo '```'
        fi
      fi
    done
  } >"$out/report.md"
}

record() {
  names+=("$1")
  statuses+=("$2")
  durations+=("$3")
  results+=("${4:-–}")
  write_report
}

# The last non-blank line of a log; empty, not a failure, for a log with none.
last_line() {
  { grep -v '^[[:space:]]*$' "$1" || true; } | tail -n 1 | cut -c1-160
}

# run_stage NAME LIMIT COMMAND...: COMMAND under a time limit (timeout signals its whole
# process group, benchmark workers included), output to the console and NAME.log.
# Sets stage_rc and stage_status; never fails itself.
run_stage() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (limit ${limit} s): $*"
  # A report left in $OUT by an earlier run must not pass for this run's.
  rm -f "$out/$name.log" "$out/$name.md"
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  stage_rc=${PIPESTATUS[0]}
  set -e
  case $stage_rc in
    0) stage_status=ok ;;
    124 | 137) stage_status="failed: timed out after $limit s" ;;
    *) stage_status="failed: exit $stage_rc: $(last_line "$out/$name.log")" ;;
  esac
}

summary_of() {
  if [[ -s $work/$1.summary ]]; then
    head -n 1 "$work/$1.summary" | cut -c1-700
  fi
}

if [[ $cpu == 0 ]] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "torch sees no CUDA device here; rehearse on CPU with: bench/device_check.sh --cpu" >&2
  exit 2
fi

# --- wheels carried to the machine (inf-cl, say): installed apart from the image's own.
wheels=${WHEELS:-.whl}
start=$SECONDS
if [[ $cpu == 1 ]]; then
  record wheels "skipped: the CPU rehearsal uses this machine's packages" 0
elif compgen -G "$wheels/*.whl" >/dev/null; then
  run_stage wheels 15 "$python" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target "$work/site" "$wheels"/*.whl
  export PYTHONPATH="$work/site:$PYTHONPATH"
  record wheels "$stage_status" $((SECONDS - start)) "$(cd "$wheels" && echo *.whl)"
else
  record wheels "skipped: no wheels in $wheels/" 0
fi

# --- (a) the device and its ceilings.
start=$SECONDS
run_stage ceilings "$limit_ceilings" "$python" bench/infonce.py --ceilings --device "$device" \
  --out "$out/ceilings.md" --json "$work/ceilings.json"
peak=""
ceilings_result=""
if [[ -s $work/ceilings.json ]]; then
  read -r peak ceilings_result < <("$python" -c '
import json, sys
facts = json.load(open(sys.argv[1]))
tflops = facts["bf16_tflops"]
print(
    "{} {}: bf16 matmul {} TFLOP/s, copy {:.0f} GB/s, driver {}".format(
        tflops, facts["device"], f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.2g}",
        facts["copy_gbps"], facts.get("driver", "–"),
    )
)' "$work/ceilings.json") || true
fi
record ceilings "$stage_status" $((SECONDS - start)) "$ceilings_result"

# --- (b) the CUDA-only tests. Modules needing hydra, faiss or wandb, which the image
# lacks, are reported as skipped by tests/conftest.py.
start=$SECONDS
# Triton compiles each kernel variant on the host's CPU, one at a time per process: on the
# GPU machine's 16 cores, pytest-xdist (in its image) runs the modules side by side.
parallel=()
if [[ $cpu == 0 ]] && "$python" -c 'import xdist' 2>/dev/null; then
  parallel=(-n 4 --dist loadfile)
fi
TESTS_SKIP_MISSING=1 run_stage pytest "$limit_pytest" "$python" -m pytest -m gpu -ra -q --durations=8 \
  -p no:cacheprovider "${parallel[@]}"
{
  echo '```text'
  if grep -q 'short test summary info' "$out/pytest.log"; then
    sed -n '/short test summary info/,$p' "$out/pytest.log"
  else
    tail -n 5 "$out/pytest.log"
  fi
  echo '```'
} >"$out/pytest.md"
pytest_result=$(last_line "$out/pytest.log" | tr -d '=' | sed 's/^ *//; s/ *$//')
case $stage_rc in
  0) ;;
  5) stage_status="failed: no test ran (exit 5)" ;;
  1) stage_status="failed: some tests failed" ;;
esac
record pytest "$stage_status" $((SECONDS - start)) "$pytest_result"

# --- (c) the InfoNCE kernels against naive, chunked torch and Inf-CL; the summary leads
# with the fused kernel's share of the ceilings stage's matmul rate at B = N = 16,384
# (on CPU the rehearsal's tiny sizes against the CPU's matmul: the plumbing, not a figure).
start=$SECONDS
peak_args=()
if [[ -n $peak ]]; then
  peak_args=(--peak-tflops "$peak")
fi
run_stage kernels "$limit_kernels" "$python" bench/infonce.py --device "$device" \
  --budget $((limit_kernels - 15)) "${peak_args[@]}" "${infonce_args[@]}" \
  --out "$out/kernels.md" --summary "$work/kernels.summary"
record kernels "$stage_status" $((SECONDS - start)) "$(summary_of kernels)"

# --- (c') torch.compile'd naive loss against naive, with a budget of its own.
start=$SECONDS
run_stage compiled "$limit_compiled" "$python" bench/infonce.py --device "$device" \
  --budget $((limit_compiled - 15)) "${peak_args[@]}" "${compiled_args[@]}" \
  --out "$out/compiled.md" --summary "$work/compiled.summary"
record compiled "$stage_status" $((SECONDS - start)) "$(summary_of compiled)"

# --- (c'') the kernels' tile shapes and the gemm backward's column chunk, each against the
# default in the same run.
start=$SECONDS
run_stage tiles "$limit_tiles" "$python" bench/infonce_tiles.py --device "$device" \
  "${tiles_args[@]}" --out "$out/tiles.md" --summary "$work/tiles.summary"
record tiles "$stage_status" $((SECONDS - start)) "$(summary_of tiles)"

# --- (d) training steps and encoding, ours (GradCache by texts and by tokens) against
# sentence-transformers, at each batch size; the summary states the targets.
start=$SECONDS
run_stage train "$limit_train" "$python" bench/gpu_train.py --device "$device" \
  --budget $((limit_train - 20)) "${train_args[@]}" --out "$out/train.md" \
  --summary "$work/train.summary"
record train "$stage_status" $((SECONDS - start)) "$(summary_of train)"

echo
echo "report: $out/report.md ($SECONDS s)"
echo
summary_table
for status in "${statuses[@]}"; do
  [[ $status == failed* ]] && exit 1
done
exit 0
