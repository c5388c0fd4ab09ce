#!/bin/bash
# Distillation on several nodes with SLURM: one `accelerate launch` per node (started by srun),
# each starting one process per GPU. Submit with:  sbatch scripts/slurm_multinode.sh
# Values marked PLACEHOLDER are for your cluster. The run folder must be on a filesystem every
# node sees: rank 0 writes checkpoints and exports, and --resume reads them back.
#SBATCH --job-name=kd-distill
#SBATCH --nodes=2                    # PLACEHOLDER: machines
#SBATCH --ntasks-per-node=1          # one launcher per node; it forks the GPU processes
#SBATCH --gpus-per-node=8            # PLACEHOLDER: GPUs per machine
#SBATCH --cpus-per-task=64           # PLACEHOLDER
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --partition=gpu              # PLACEHOLDER
set -euo pipefail

GPUS_PER_NODE=8                                       # keep equal to --gpus-per-node
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)   # the first node hosts rank 0
MAIN_PORT=29500                                       # PLACEHOLDER: a free port on that node
DATASET=/shared/data/cifar10                          # PLACEHOLDER: local copy (compute nodes often have no internet)
OUT=/shared/runs/distill-$SLURM_JOB_ID                # PLACEHOLDER: on shared storage
export KD_CACHE_DIR=/shared/cache/kd                  # decoded dataset cache, shared: decoded once
BATCH=1024                                            # PLACEHOLDER: global batch over all GPUs
LR=$(awk "BEGIN {print 0.2 * $BATCH / 512}")          # linear scaling from the default 0.2 per 512 images
export OMP_NUM_THREADS=8
# export WANDB_MODE=offline                           # if compute nodes cannot reach wandb; `wandb sync` later

cd "${SLURM_SUBMIT_DIR:-.}"
# Single quotes: $SLURM_NODEID is expanded by each node's shell, so each launcher gets its own rank.
# --cpus-per-task again on srun: since Slurm 22.05 srun no longer inherits it from sbatch
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c 'accelerate launch \
  --multi_gpu --mixed_precision bf16 --dynamo_backend no \
  --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
  --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
  --main_process_ip '"$MAIN_ADDR"' --main_process_port '"$MAIN_PORT"' \
  --rdzv_backend static --same_network \
  distill.py --dataset '"$DATASET"' --teacher /shared/runs/teacher --output-dir '"$OUT"' \
    --mode logits --epochs 240 --batch-size '"$BATCH"' --lr '"$LR"   # PLACEHOLDER: teacher and hyperparameters
