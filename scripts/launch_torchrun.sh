#!/usr/bin/env bash
# scripts/launch_torchrun.sh NUM_NODES GPUS_PER_NODE [-- more trainer arguments]
# torchrun starts the processes, GPUS_PER_NODE on each node, and Lightning joins them (it reads torchrun's
# RANK, LOCAL_RANK and WORLD_SIZE). Run the same command on every node:
#   node 0:   NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh 2 8
#   node 1:   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh 2 8
# One machine needs no address:   scripts/launch_torchrun.sh 1 4
# To try it without a GPU:        ACCELERATOR=cpu CONFIG=configs/line.yaml scripts/launch_torchrun.sh 1 2
# The effective batch is batch_size × GPUS_PER_NODE × NUM_NODES; the trainer's devices and num_nodes are
# set from the same two numbers, as Lightning requires.
set -euo pipefail
export PYTHONUNBUFFERED=1

if [[ $# -lt 2 ]]; then
    echo "usage: scripts/launch_torchrun.sh NUM_NODES GPUS_PER_NODE [-- more trainer arguments]" >&2
    exit 2
fi
NUM_NODES="$1"
PER_NODE="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ "$NUM_NODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, and NODE_RANK}"
    rendezvous=(--node_rank "${NODE_RANK:?set NODE_RANK to the rank of this node, 0 … NUM_NODES − 1}"
        --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

# `python -m torch.distributed.run` is torchrun, from the same interpreter as the trainer.
exec "$PYTHON" -m torch.distributed.run --nnodes "$NUM_NODES" --nproc_per_node "$PER_NODE" "${rendezvous[@]}" \
    -m trainer fit --config "${CONFIG:-configs/ddp.yaml}" \
    --trainer.accelerator "${ACCELERATOR:-auto}" \
    --trainer.devices "$PER_NODE" \
    --trainer.num_nodes "$NUM_NODES" \
    --trainer.strategy ddp \
    "$@"
