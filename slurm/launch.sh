#!/usr/bin/env bash
# One torchrun per node of the Slurm allocation (srun, one task per node), meeting at the first node.
#   bash slurm/launch.sh 01_mine_regions.py --images ... --work ...     (inside an allocation: sbatch or salloc)
# The stage scripts resume from their chunks and checkpoints, so a restart of the worker group (torchrun
# --max-restarts, after a dead worker) and a requeue of the whole job (sbatch --requeue, after a preemption)
# both continue where the run stopped.
#   KIT_GPUS_PER_NODE  workers per node (default: the GPUs Slurm gave this job on a node; 1 without GPUs)
#   KIT_MAX_RESTARTS   torchrun --max-restarts (default 3)
#   KIT_RDZV_PORT      the rendezvous port on the first node (default 29500 + the job id modulo 1000)
#   KIT_PYTHON         the Python that runs torchrun (default: .venv/bin/python when there is one, else python3)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: slurm/launch.sh runs inside a Slurm allocation: sbatch slurm/<stage>.sbatch ..." >&2
    exit 2
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${KIT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
gpus=${gpus##*:}                                   # "h100:8" -> 8
[ "$gpus" -gt 0 ] 2>/dev/null || gpus=1
port=${KIT_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
python=${KIT_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} nodes x ${gpus} workers," \
     "rendezvous at ${head_node}:${port}: $*"
# one task per node; --kill-on-bad-exit: a node whose torchrun gives up ends the step on every node
exec srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$python" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$gpus" \
    --rdzv_backend=c10d --rdzv_endpoint="${head_node}:${port}" --rdzv_id="kit-${SLURM_JOB_ID}" \
    --max-restarts="${KIT_MAX_RESTARTS:-3}" "$@"
