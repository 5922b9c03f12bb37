"""Train a tiny GPT (tied embedding and head) as a 2-stage pipeline, one stage per process.

    torchrun --nproc-per-node 2 examples/train_gpt_pipeline.py [--steps 5] [--schedule 1f1b]

Every rank builds the same seeded model and plans the same cuts (the plan only decides
where to cut; ``device="h100"`` costs it for an H100). Rank r then keeps stage r only.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partitioner import partition
from passes.zoo import tiny_gpt
from runtime import Runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--microbatch-size", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab, seq = 256, 32
    model, (example,) = tiny_gpt(n_layers=4, d_model=64, n_heads=4, batch=args.microbatch_size, seq=seq,
                                 vocab_size=vocab)
    # stage graphs are specialised to the example shape: plan with one micro-batch
    plan = partition(model, 2, (example,), device="h100", n_microbatches=args.microbatches, schedule=args.schedule)

    def loss_fn(logits, target):
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))

    runner = Runner(plan, schedule=args.schedule, n_microbatches=args.microbatches, loss_fn=loss_fn,
                    optimizer_fn=lambda params: torch.optim.AdamW(params, lr=3e-3))
    rank = dist.get_rank()
    if rank == 0:
        print(plan.report())
    batch = args.microbatch_size * args.microbatches
    data = torch.randint(0, vocab, (batch, seq + 1))    # one fixed batch: the loss should fall
    for step in range(args.steps):
        loss = runner.step((data[:, :-1],), data[:, 1:])
        if rank == 0:
            print(f"step {step}: loss {loss:.4f}")
    report = runner.memory_report()
    if rank == 0:
        for row in report:
            print(f"rank {row['rank']}: measured peak {row['measured_peak_bytes'] / 2**20:.1f} MiB "
                  f"({row['measured_by']}), plan estimate {row['estimated_bytes'] / 2**20:.2f} MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
