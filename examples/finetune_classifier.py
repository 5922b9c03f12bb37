"""Fine-tune a small GPT as a sequence classifier in half the memory of full fine-tuning.

Everything is generated here (no downloads): a TinyGPT is "pretrained" briefly as a
language model on unlabeled sequences, given a new 3-class head (``attach_classifier``),
and ``finetune`` chooses what trains so that an AdamW step fits half of what full
fine-tuning needs. The task: each class draws half of its tokens from its own 8 "topic"
tokens, the rest uniformly, so the class is learnable from token counts (chance: 33%).

    python examples/finetune_classifier.py            # about a minute on 2 CPU cores
"""
import time

import torch
import torch.nn.functional as F

from passes import estimate
from passes.finetune import attach_classifier, finetune
from passes.monitor import measure_step
from passes.zoo import TinyGPT

VOCAB, SEQ, BATCH, N_CLASSES = 128, 32, 32, 3
PRETRAIN_STEPS, FINETUNE_STEPS, PRETRAIN_LR, LR = 30, 110, 1e-3, 1e-2


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, N_CLASSES, (n,), generator=generator)
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    topic = labels[:, None] * 8 + torch.randint(0, 8, (n, SEQ), generator=generator)    # class c: tokens 8c..8c+7
    pick = torch.rand(n, SEQ, generator=generator) < 0.5
    return torch.where(pick, topic, tokens), labels


def pretrain(model: TinyGPT, data: torch.Tensor) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    for step in range(PRETRAIN_STEPS):
        idx = data[step * BATCH % len(data):][:BATCH]
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pretrained {PRETRAIN_STEPS} LM steps, final LM loss {loss.item():.3f}")


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    start = time.time()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_x, train_y = make_data(2048, gen)
    test_x, test_y = make_data(512, gen)

    backbone = TinyGPT(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=4, max_seq=SEQ)
    pretrain(backbone, train_x)
    model = attach_classifier(backbone, N_CLASSES, pool="mean")

    batch_x, batch_y = train_x[:BATCH], train_y[:BATCH]
    loss_fn = lambda logits: F.cross_entropy(logits, batch_y)  # noqa: E731 - costs the real loss
    full = estimate(model, (batch_x,), training=True, optimizer="adamw", loss_fn=loss_fn)
    plan = finetune(model, (batch_x,), memory_limit=full.peak_bytes // 2, loss_fn=loss_fn)
    print(plan)
    measured = measure_step(plan.module, (batch_x,), loss_fn=loss_fn)
    print(f"\nmeasured step peak {measured.peak_bytes} B, estimated {plan.estimate.peak_bytes} B, "
          f"limit {full.peak_bytes // 2} B, full fine-tuning {full.peak_bytes} B\n")

    model = plan.module
    print(f"before fine-tuning: test accuracy {accuracy(model, test_x, test_y):.1%} (chance {1 / N_CLASSES:.1%})")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(FINETUNE_STEPS):
        i = torch.randint(0, len(train_x), (BATCH,))
        loss = F.cross_entropy(model(train_x[i]), train_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == FINETUNE_STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    print(f"after fine-tuning: test accuracy {accuracy(model, test_x, test_y):.1%} "
          f"(chance {1 / N_CLASSES:.1%}); {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
