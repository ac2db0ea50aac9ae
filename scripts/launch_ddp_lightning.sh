#!/usr/bin/env bash
# scripts/launch_ddp_lightning.sh [DEVICES] [-- more trainer arguments]
#   scripts/launch_ddp_lightning.sh                     every GPU of this machine, configs/ddp.yaml
#   scripts/launch_ddp_lightning.sh 4 --model.lr 0.05   four GPUs, any override after the count
#   ACCELERATOR=cpu scripts/launch_ddp_lightning.sh 2   two CPU processes (gloo), e.g. to try it on a laptop
#   CONFIG=configs/line.yaml scripts/launch_ddp_lightning.sh 2
# Lightning's own launcher: this starts one process, and Lightning starts DEVICES − 1 more copies of the
# same command line, one per device, on this machine. The simplest way to use several GPUs of one machine.
# Several machines without a scheduler work the same way, run once on every node with the same MASTER_ADDR
# (node 0's address), MASTER_PORT, NUM_NODES and each its own NODE_RANK (0 … NUM_NODES − 1):
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=1 NUM_NODES=2 scripts/launch_ddp_lightning.sh 8
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICES="${1:-auto}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift

exec "$PYTHON" -m trainer fit --config "${CONFIG:-configs/ddp.yaml}" \
    --trainer.accelerator "${ACCELERATOR:-auto}" \
    --trainer.devices "$DEVICES" \
    --trainer.num_nodes "${NUM_NODES:-1}" \
    --trainer.strategy ddp \
    "$@"
