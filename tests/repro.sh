#!/usr/bin/env bash
# The numbers depend on neither the compile target nor the thread count: bt built with -march=native
# and with -march=x86-64-v3 (any AVX2+FMA machine), each run at OMP_NUM_THREADS=1 and 2, trains the
# same five small runs (vanilla, which is also the backbone of the next two; bt frozen with --bptt
# full; bt frozen with --bptt step; bt joint; bt joint with the periodic:8 schedule). Every
# checkpoint, its .state (AdamW moments, loss of every step), the bt eval table and the bt score
# output must be bitwise equal (cmp) across the four (build, threads) combinations. A third build,
# -march=x86-64 (no AVX2, no FMA: tensor.hpp's plain loops, with fmaf from libm), runs once at one
# thread and must give the same bytes too (it is about 50 times slower, hence one thread only).
# usage: make repro-test  (the Makefile passes CXX and CXXFLAGS_BASE: its flags without -march)
#        REPRO_KEEP=1 make repro-test keeps the scratch folder to look at a difference
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
CXX=${CXX:-g++}
if [ -z "${CXXFLAGS_BASE:-}" ]; then
  echo "tests/repro.sh: CXXFLAGS_BASE is not set (the Makefile's compile flags without -march); run: make repro-test"
  exit 2
fi
dir=$(mktemp -d)
if [ "${REPRO_KEEP:-0}" = 1 ]; then trap 'echo "kept $dir"' EXIT; else trap 'rm -rf "$dir"' EXIT; fi
# OMP_NUM_THREADS=2 with spinning waits crawls when another process holds one of two cores;
# passive waits cost nothing when idle and change no number
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} OMP_DYNAMIC=false
t_start=$SECONDS

# ---- which comparisons this machine can make
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
targets=(native x86-64-v3 x86-64)
if ! has avx2 || ! has fma; then
  targets=(native x86-64)
  echo "no AVX2+FMA on this CPU: x86-64-v3 binaries cannot run here, only thread counts are compared"
elif ! has avx512f; then
  echo "no AVX-512 on this CPU: -march=native and -march=x86-64-v3 coincide here (same vector width)," \
       "so native vs x86-64-v3 is a real check only on an AVX-512 machine"
else
  echo "AVX-512 on this CPU: -march=native (512-bit vectors) against -march=x86-64-v3 (256-bit) is a real check"
fi

# ---- build each target into the scratch folder (the repo's ./bt is left alone), in parallel
echo "building bt with$(printf ' -march=%s' "${targets[@]}")$([ ${#targets[@]} = 1 ] || echo ' (in parallel)')…"
pids=()
for m in "${targets[@]}"; do
  # shellcheck disable=SC2086  # CXXFLAGS_BASE is a list of flags
  $CXX $CXXFLAGS_BASE -march="$m" -o "$dir/bt-$m" "$repo/bt.cpp" > "$dir/build-$m.log" 2>&1 &
  pids+=($!)
done
for i in "${!targets[@]}"; do
  m=${targets[$i]}
  if ! wait "${pids[$i]}"; then
    kill "${pids[@]}" 2>/dev/null || true
    cat "$dir/build-$m.log"; echo "✗ the -march=$m build failed"; exit 1
  fi
  echo "  $CXX $CXXFLAGS_BASE -march=$m"
done
echo "  built in $((SECONDS - t_start))s"

# ---- the runs: each combination in its own folder under the same file names, so that the flags
# kept in the .state files (--init vanilla.safetensors) are the same
data="--task chain --steps 40 --batch 8 --log-every 10 --seed 7"
size="--d-model 64 --layers 2"
modes=(vanilla bt-full bt-step bt-joint periodic)
train_flags() {
  case $1 in
    vanilla)  echo "$data $size" ;;
    bt-full)  echo "$data --model bt --init vanilla.safetensors --bptt full" ;;
    bt-step)  echo "$data --model bt --init vanilla.safetensors --bptt step" ;;
    bt-joint) echo "$data $size --model bt --joint" ;;
    periodic) echo "$data $size --model bt --joint --schedule periodic:8" ;;
  esac
}
# two chain examples for bt score (question, one line per operation, #answer$)
printf '1*4-0+3\n1*4=4\n4-0=4\n4+3=7\n#7$\n\n8+4*6-1\n8+4=2\n2*6=2\n2-1=1\n#1$\n' > "$dir/score.txt"

# native-2 -> "native, 2 threads"
name() { local m=${1%-*} th=${1##*-}; echo "$m, $th thread$([ "$th" = 1 ] || echo s)"; }
for m in "${targets[@]}"; do
  threads=(1 2)
  [ "$m" != x86-64 ] || threads=(1)   # the plain loops: one thread is enough, and slow enough
  for th in "${threads[@]}"; do
    c="$m-$th"
    mkdir "$dir/$c"
    for mode in "${modes[@]}"; do
      echo "training $mode ($(name "$c")), then bt eval and bt score…"
      # the eval header names the file, the thread count and the SIMD flags; its last line is the time
      # shellcheck disable=SC2046  # the flags are words
      ( cd "$dir/$c" && export OMP_NUM_THREADS=$th &&
        "$dir/bt-$m" train $(train_flags "$mode") --out "$mode.safetensors" > "$mode.train.log" 2>&1 &&
        "$dir/bt-$m" eval --ckpt "$mode.safetensors" --task chain --n 8 --seed 3 > "$mode.eval.log" 2>&1 &&
        grep -v -E '^bt eval \||^\(([0-9]+m)?[0-9]+s\)$' "$mode.eval.log" > "$mode.eval" &&
        "$dir/bt-$m" score --ckpt "$mode.safetensors" --text-file ../score.txt > "$mode.score" 2>&1 &&
        grep -q '^OOD ' "$mode.eval" && grep -q '^total' "$mode.score" ) ||
        { echo "✗ $mode ($(name "$c")) did not run to the end:"; tail -n 3 "$dir/$c/$mode".*; exit 1; }
    done
  done
done

# ---- compare: 1 against 2 threads within each build, then native against x86-64-v3 at 1 thread
pairs=()
for m in "${targets[@]}"; do [ "$m" = x86-64 ] || pairs+=("$m-1 $m-2"); done
for m in "${targets[@]}"; do [ "$m" = native ] || pairs+=("native-1 $m-1"); done
n_ok=0; n_bad=0; first=""
for p in "${pairs[@]}"; do
  read -r a b <<< "$p"
  for mode in "${modes[@]}"; do
    differ=()
    for kind in checkpoint state eval score; do
      case $kind in
        checkpoint) f=$mode.safetensors ;;
        state)      f=$mode.safetensors.state.safetensors ;;
        *)          f=$mode.$kind ;;
      esac
      if ! cmp -s "$dir/$a/$f" "$dir/$b/$f"; then
        differ+=("$kind")
        [ -n "$first" ] ||
          first="$a/$f and $b/$f ($(cmp "$dir/$a/$f" "$dir/$b/$f" 2>&1 | sed -e 's/.* differ: //; s/, line .*//' -e "s|$dir/||g" || true))"
      fi
    done
    if [ ${#differ[@]} = 0 ]; then
      n_ok=$((n_ok + 1))
      printf '✓ %-9s %-20s = %-20s (checkpoint, state, eval, score)\n' "$mode" "$(name "$a")" "$(name "$b")"
    else
      n_bad=$((n_bad + 1))
      printf -v list '%s, ' "${differ[@]}"; list=${list%, }
      printf '✗ %-9s %-20s ≠ %-20s (%s differ)\n' "$mode" "$(name "$a")" "$(name "$b")" "$list"
    fi
  done
done

if [ "$n_bad" = 0 ]; then
  echo "ok: $n_ok comparisons, every one bitwise equal ($((SECONDS - t_start))s)"
else
  echo "FAIL: $n_bad of $((n_ok + n_bad)) comparisons differ ($((SECONDS - t_start))s); the first: $first"
  exit 1
fi
