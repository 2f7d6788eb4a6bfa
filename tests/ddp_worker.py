"""`training.run` under torchrun, recording each rank's trained weights (tests/test_distributed.py).

python -m torch.distributed.run --nproc_per_node=2 -m tests.ddp_worker WEIGHTS_DIR <training.run arguments>

At the end of each fit, before rank 0's best checkpoint is broadcast to the other ranks, every rank appends the
sha256 of its parameters to WEIGHTS_DIR/rank<N>.txt: identical lines mean DistributedDataParallel kept the ranks
in step.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from torch import nn

from training import distributed, run


def main() -> int:
    weights_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    broadcast_state = distributed.broadcast_state

    def record_then_broadcast(model: nn.Module) -> None:
        digest = hashlib.sha256()
        for name, parameter in model.named_parameters():
            digest.update(name.encode() + parameter.detach().cpu().numpy().tobytes())
        with open(weights_dir / f"rank{distributed.rank()}.txt", "a") as handle:
            handle.write(digest.hexdigest() + "\n")
        broadcast_state(model)

    distributed.broadcast_state = record_then_broadcast
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
