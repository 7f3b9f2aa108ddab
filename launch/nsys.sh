#!/usr/bin/env bash
# Nsight Systems capture of a step range, single node: nsys starts recording when the program
# calls cudaProfilerStart() and stops at cudaProfilerStop() (--capture-range=cudaProfilerApi
# --capture-range-end=stop). Megatron-LM's training loop makes those calls on the ranks in
# --profile-ranks when given --profile --profile-step-start S --profile-step-end E, and with
# --nvtx-ranges it also turns on Megatron's NVTX ranges, which carry PR2's pr2/* ranges
# (pr2/replay, pr2/record, pr2/predictor, ...).
#
#   launch/nsys.sh [options] [--] [program args...]
#
# Options:
#   --start S        first profiled step (default: $PROFILE_STEP_START, else 10)
#   --end E          step at which capture stops (default: $PROFILE_STEP_END, else 12)
#   --ranks "R..."   ranks that call the profiler API (default: $PROFILE_RANKS, else 0)
#   --output PATH    report path, nsys %-patterns allowed (default: nsys/pr2-%h-%p)
#   --trace LIST     nsys -t list (default: cuda,nvtx,osrt,cublas,cudnn)
#   --nproc N        ranks on this node (default: $NPROC, else the GPU count, as torchrun.sh)
#   --module M       python module to run (default: megatron_pr2.rl.demo)
#   --script PATH    python script instead (e.g. Megatron-LM's pretrain_gpt.py)
#   --no-nvtx-ranges do not pass --nvtx-ranges (Megatron-LM releases without that flag)
#   --dry-run        print the exact command and exit (also DRY_RUN=1)
#   -h, --help       this help
# Environment overrides: NSYS (nsys), PYTHON (python3), MASTER_ADDR, MASTER_PORT,
#   CUDA_DEVICE_MAX_CONNECTIONS (1), OMP_NUM_THREADS (8).
#
# Example: launch/nsys.sh --script pretrain_gpt.py --start 20 --end 22 -- <Megatron-LM args>
# then: nsys stats nsys/pr2-<host>-<pid>.nsys-rep, or open it in the Nsight Systems GUI.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

dry_run=${DRY_RUN:-0}
start=${PROFILE_STEP_START:-10}
end=${PROFILE_STEP_END:-12}
ranks=${PROFILE_RANKS:-0}
output=nsys/pr2-%h-%p
trace=cuda,nvtx,osrt,cublas,cudnn
nproc=${NPROC:-}
module=megatron_pr2.rl.demo
script=
nvtx_ranges=1
while (($#)); do
    case "$1" in
        --start)
            start=${2:?--start needs a value}
            shift
            ;;
        --end)
            end=${2:?--end needs a value}
            shift
            ;;
        --ranks)
            ranks=${2:?--ranks needs a value}
            shift
            ;;
        --output)
            output=${2:?--output needs a value}
            shift
            ;;
        --trace)
            trace=${2:?--trace needs a value}
            shift
            ;;
        --nproc)
            nproc=${2:?--nproc needs a value}
            shift
            ;;
        --module)
            module=${2:?--module needs a value}
            script=
            shift
            ;;
        --script)
            script=${2:?--script needs a value}
            shift
            ;;
        --no-nvtx-ranges) nvtx_ranges=0 ;;
        --dry-run) dry_run=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            break
            ;;
        *) break ;;
    esac
    shift
done

if [[ -z $nproc ]]; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    ((nproc > 0)) || nproc=1
fi
for value in "$start" "$end" "$nproc"; do
    if ! [[ $value =~ ^[0-9]+$ ]]; then
        echo "nsys.sh: --start/--end/--nproc must be integers, got '$value'" >&2
        exit 2
    fi
done
if ((end <= start)); then
    echo "nsys.sh: --end ($end) must be greater than --start ($start)" >&2
    exit 2
fi

if [[ -n $script ]]; then
    entry=("$script")
else
    entry=(-m "$module")
fi
read -r -a rank_list <<<"$ranks"
profile_args=(--profile --profile-step-start "$start" --profile-step-end "$end"
    --profile-ranks "${rank_list[@]}")
if ((nvtx_ranges)); then
    profile_args+=(--nvtx-ranges)
fi

env_vars=(
    "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
)
cmd=(
    "${NSYS:-nsys}" profile
    --capture-range=cudaProfilerApi
    --capture-range-end=stop
    -t "$trace"
    -s none
    --cpuctxsw=none
    --force-overwrite=true
    -o "$output"
    "${PYTHON:-python3}" -m torch.distributed.run
    --nnodes=1
    --node-rank=0
    --nproc-per-node="$nproc"
    --master-addr="${MASTER_ADDR:-127.0.0.1}"
    --master-port="${MASTER_PORT:-29500}"
    "${entry[@]}" "$@" "${profile_args[@]}"
)

if ((dry_run)); then
    printf '%q ' "${env_vars[@]}" "${cmd[@]}"
    printf '\n'
    exit 0
fi
if [[ $output == */* ]]; then
    mkdir -p "${output%/*}"
fi
exec env "${env_vars[@]}" "${cmd[@]}"
