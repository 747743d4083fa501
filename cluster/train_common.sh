#!/bin/bash
# Shared body of cluster/train_*.slurm (sourced; not a job script itself).
#
# Expects DEFAULT_CONFIG from the caller. Environment overrides (nothing in the job script
# needs editing to run elsewhere, e.g. on one CPU node for testing):
#   MEGAFUSION_CONFIG     preset or YAML                   (default: $DEFAULT_CONFIG)
#   MEGAFUSION_OVERRIDES  extra key=value overrides, space-separated
#   MEGAFUSION_HF_LLAMA   base Llama directory (checkpoint.hf_llama)
#   MEGAFUSION_LOAD       converted/resharded checkpoint to start from (checkpoint.load)
#   RUN_DIR               run folder: metrics, config.yaml, checkpoints/, git revision
#   MASTER_PORT           rendezvous port (default: derived from the job id)
#   MEGAFUSION_RENDEZVOUS_HOST  rendezvous host (default: the first host of the allocation, by the name
#                         `scontrol show hostnames` gives; set it where that name does not reach the nodes)
#   GLOO_SOCKET_IFNAME    interface for gloo (CPU ranks, and the gloo side groups); default: the interface
#                         that holds the rendezvous host's address on that host (the batch shell runs there),
#                         assumed to be named alike on every node; unset when that address is loopback
#   NCCL_SOCKET_IFNAME    interfaces for NCCL's socket traffic (default ^lo,docker0: any but those)
#   NCCL_DEBUG, NCCL_IB_TIMEOUT, OMP_NUM_THREADS      (defaults below)
# Nothing else is read: the multi-node test (tests/e2e/test_slurm_multinode.py) sets only these.
# Preemption: SLURM sends USR1 to this shell 600 s before the time limit (--signal=B:USR1@600),
# room for the step in flight plus a 70B checkpoint save.
# The trap forwards it to srun (which forwards it to every rank); the trainer saves a
# checkpoint and exits 0; then the job requeues itself and the next run resumes from `latest`.
set -euo pipefail

ROOT="${MEGAFUSION_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"   # sbatch from the repository root
cd "$ROOT"
CONFIG="${MEGAFUSION_CONFIG:-$DEFAULT_CONFIG}"
RUN_DIR="${RUN_DIR:-runs/${CONFIG}}"
mkdir -p "$RUN_DIR"

# Rendezvous: the first host of the allocation; every srun task maps SLURM_PROCID/NTASKS/LOCALID
# to RANK/WORLD_SIZE/LOCAL_RANK itself (megafusion.parallel.process_groups.init_distributed).
MASTER_ADDR="${MEGAFUSION_RENDEZVOUS_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_ADDR
# gloo binds the address its hostname resolves to unless told an interface: 127.0.1.1 on a stock Debian
# /etc/hosts, which no other node can reach. Take the interface of the rendezvous address instead.
if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
  RDZV_IP="$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk 'NR == 1 {print $1}' || true)"
  RDZV_IF="$(ip -o -4 addr show 2>/dev/null | awk -v ip="$RDZV_IP" '{split($4, a, "/")} a[1] == ip {print $2; exit}' || true)"
  if [[ -n "$RDZV_IF" && "$RDZV_IP" != 127.* ]]; then
    export GLOO_SOCKET_IFNAME="$RDZV_IF"
  fi
fi
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# What a GPU cluster needs; harmless on CPU nodes (gloo ignores NCCL_*).
export CUDA_DEVICE_MAX_CONNECTIONS=1           # megatron-core: TP/SP communication ordered with compute
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1       # a hung collective aborts the job instead of blocking forever
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"   # srun (22.05+) no longer inherits --cpus-per-task
export PYTHONUNBUFFERED=1
# the trainer compares it with its measured save time (training/checkpointing.py)
export MEGAFUSION_PREEMPT_LEAD_S="${MEGAFUSION_PREEMPT_LEAD_S:-${PREEMPT_LEAD_S:-600}}"

{
  echo "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} ($(date -u +%FT%TZ))"
  DIRTY="$(git -C "$ROOT" status --porcelain 2>/dev/null || true)"
  echo "git $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)${DIRTY:+ (with uncommitted changes)}"
} >> "$RUN_DIR/slurm_jobs.log"
git -C "$ROOT" rev-parse HEAD > "$RUN_DIR/git_revision.txt" 2>/dev/null || echo unknown > "$RUN_DIR/git_revision.txt"

ARGS=(--config "$CONFIG" "logging.run_dir=$RUN_DIR")
[[ -n "${MEGAFUSION_HF_LLAMA:-}" ]] && ARGS+=("checkpoint.hf_llama=$MEGAFUSION_HF_LLAMA")
[[ -n "${MEGAFUSION_LOAD:-}" ]] && ARGS+=("checkpoint.load=$MEGAFUSION_LOAD")
read -r -a EXTRA <<< "${MEGAFUSION_OVERRIDES:-}"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})   # (empty-array safe under set -u on bash < 4.4)

# Validate against SLURM_NTASKS before any rank starts: a bad config fails here, naming the key.
python -m launcher.train --check "${ARGS[@]}"

requeue() {
  echo "[slurm] USR1: asking the trainer to checkpoint, then requeueing job ${SLURM_JOB_ID}"
  kill -USR1 "$SRUN_PID" 2>/dev/null || true
  local code=0
  wait "$SRUN_PID" || code=$?
  if [[ $code -ne 0 ]]; then   # the save failed: do not loop on a broken run
    echo "[slurm] the trainer exited with $code while saving; not requeueing" >&2
    exit "$code"
  fi
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

echo "[slurm] ${SLURM_NTASKS} tasks on ${SLURM_JOB_NUM_NODES} node(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT} (gloo interface ${GLOO_SOCKET_IFNAME:-by hostname}): launcher.train ${ARGS[*]}"
srun --kill-on-bad-exit=1 python -m launcher.train "${ARGS[@]}" &
SRUN_PID=$!
wait "$SRUN_PID"
