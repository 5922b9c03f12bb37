"""Train a tiny GPT (tied embedding and head) across processes, one per device.

    torchrun --nproc-per-node 2 examples/train_gpt_pipeline.py [--steps 5] [--schedule 1f1b] [--microbatches 4]
    torchrun --nproc-per-node 4 examples/train_gpt_pipeline.py --strategy auto      # let the planner pick the mesh
    torchrun --nproc-per-node 4 examples/train_gpt_pipeline.py --mesh dp=2,pp=2
    torchrun --nproc-per-node 2 examples/train_gpt_pipeline.py --schedule interleaved-1f1b   # 2 stages per rank

Every rank builds the same seeded model and plans it from the same global batch (the plan only
decides; ``device="h100"`` costs it for H100s). By default the plan is a pipeline of one stage
per process; the Runner splits each global batch into ``--microbatches`` micro-batches per
data-parallel replica. Rank r keeps only its part of the model.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partitioner import partition
from passes.zoo import tiny_gpt
from runtime import Runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategy", choices=["pipeline", "auto", "data", "tensor"], default="pipeline")
    parser.add_argument("--mesh", default="", help="e.g. dp=2,pp=2 (overrides --strategy)")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe", "interleaved-1f1b"], default="1f1b",
                        help="interleaved-1f1b: each rank holds several stages (rank r: r, r + pp, ...)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per data-parallel replica")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))} if args.mesh else None

    torch.manual_seed(0)
    vocab, seq = 256, 32
    model, (example,) = tiny_gpt(n_layers=4, d_model=64, n_heads=4, batch=args.batch, seq=seq, vocab_size=vocab)
    plan = partition(model, world, (example,), strategy="auto" if mesh else args.strategy, mesh=mesh,
                     device="h100", n_microbatches=args.microbatches, schedule=args.schedule)

    def loss_fn(logits, target):
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))

    runner = Runner(plan, loss_fn=loss_fn, optimizer_fn=lambda params: torch.optim.AdamW(params, lr=3e-3),
                    track_memory=True)
    rank = dist.get_rank()
    if rank == 0:
        print(plan.report())
    data = torch.randint(0, vocab, (args.batch, seq + 1))    # one fixed batch: the loss should fall
    for step in range(args.steps):
        loss = runner.step((data[:, :-1],), data[:, 1:])
        if rank == 0:
            print(f"step {step}: loss {loss:.4f}")
    report = runner.memory_report()
    if rank == 0:
        for row in report:
            print(f"rank {row['rank']} (stages {row['stages']}, replica {row['replica']}, shard {row['shard']}): "
                  f"measured peak {row['measured_peak_bytes'] / 2**20:.2f} MiB ({row['measured_by']}), "
                  f"plan estimate {row['estimated_bytes'] / 2**20:.2f} MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
