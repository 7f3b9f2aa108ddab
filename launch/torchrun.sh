#!/usr/bin/env bash
# Single-node launcher: torchrun (python -m torch.distributed.run) of the PR2 RL demo or any
# entry point, one process per GPU, or N gloo ranks on CPU with --cpu.
#
#   launch/torchrun.sh [options] [--] [program args...]
#
# Options:
#   --cpu            CPU / gloo: hide GPUs (CUDA_VISIBLE_DEVICES=), OMP_NUM_THREADS=1 per rank,
#                    NPROC defaults to 2. The demo then applies megatron_pr2's CPU patches itself.
#   --nproc N        ranks on this node (default: $NPROC, else 2 with --cpu, else the GPU count)
#   --module M       python module to run (default: megatron_pr2.rl.demo)
#   --script PATH    python script to run instead of a module (e.g. Megatron-LM's pretrain_gpt.py)
#   --dry-run        print the exact command (with the environment it sets) and exit
#   -h, --help       this help
# Environment overrides: NPROC, MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3),
#   OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS (1 on GPU), DRY_RUN=1 (same as --dry-run).
#
# Examples:
#   launch/torchrun.sh --cpu --nproc 2 -- --quick --mode pr2 --run-dir runs/cpu2
#   NPROC=8 launch/torchrun.sh -- --mode pr2 --expert-parallel-size 8
#   launch/torchrun.sh --script pretrain_gpt.py -- <Megatron-LM args> --pr2-mode pr2
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

cpu=0
dry_run=${DRY_RUN:-0}
nproc=${NPROC:-}
module=megatron_pr2.rl.demo
script=
while (($#)); do
    case "$1" in
        --cpu) cpu=1 ;;
        --dry-run) dry_run=1 ;;
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

python=${PYTHON:-python3}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}

env_vars=()
if ((cpu)); then
    nproc=${nproc:-2}
    # An empty CUDA_VISIBLE_DEVICES hides every GPU: torch picks gloo and the CPU code paths.
    env_vars+=("CUDA_VISIBLE_DEVICES=" "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
else
    if [[ -z $nproc ]]; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            nproc=$(nvidia-smi -L | grep -c '^GPU ' || true)
        fi
        nproc=${nproc:-1}
        ((nproc > 0)) || nproc=1
    fi
    # Megatron: one CUDA work queue keeps TP/SP communication ordered before the GEMMs it feeds.
    env_vars+=(
        "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
        "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
    )
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun.sh: --nproc/NPROC must be a positive integer, got '$nproc'" >&2
    exit 2
fi

if [[ -n $script ]]; then
    entry=("$script")
else
    entry=(-m "$module")
fi
cmd=(
    "$python" -m torch.distributed.run
    --nnodes=1
    --node-rank=0
    --nproc-per-node="$nproc"
    --master-addr="$master_addr"
    --master-port="$master_port"
    "${entry[@]}" "$@"
)

if ((dry_run)); then
    printf '%q ' "${env_vars[@]}" "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec env "${env_vars[@]}" "${cmd[@]}"
