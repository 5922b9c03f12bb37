"""Fine-tune where the task's signal sits early: ``finetune`` reads the task and trains the first block.

Everything is generated here (no downloads). A small GPT classifier is pretrained to read a
bit off each of its first two tokens (``passes.zoo.tasks``). The target task re-encodes the
inputs by a permutation of the vocabulary, as after a change of tokenizer: the bits are the
same, but the map from token to bit has to be relearnt where the tokens are read, early in
the network. The blocks after it see bits already computed from the wrong tokens.

The budget is half of what full fine-tuning needs. By budget alone, ``finetune`` trains
the most parameters that fit, which are the last blocks (they need no activations saved
below them). Given 16 batches of the task (``data=``), it probes each block and trains the
one that buys the most. Both plans then train for the same 300 steps.

    python examples/finetune_early_signal.py      # about 2 minutes on 2 CPU cores
"""
import copy
import time

import torch

from passes import estimate, measure_step
from passes.finetune import finetune
from passes.zoo.tasks import TASKS, pretrained_classifier

STEPS, LR, BATCH, N_DATA_BATCHES = 300, 1e-3, 16, 16


def train_and_score(model, task, batches, test) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for (x,), y in batches:
        loss = task.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return task.metric(model(test[0]), test[1])


def run(task_name: str) -> None:
    start = time.time()
    torch.set_num_threads(1)      # tiny ops: one thread is faster than several waiting for each other
    pretrained = pretrained_classifier(d_model=384, n_layers=4, steps=400)
    task = TASKS[task_name]
    batches = task.batches(STEPS, BATCH, seed=1)
    test = task.sample(2000, seed=2)
    (x0,), y0 = batches[0]
    step_loss = lambda out: task.loss_fn(out, y0)  # noqa: E731 - the step the budget is for
    full = estimate(pretrained, (x0,), training=True, optimizer="adamw", loss_fn=step_loss)
    budget = full.peak_bytes // 2
    print(f"task {task_name!r} (signal sits {task.where}); budget {budget / 2**20:.1f} MiB, half of full "
          f"fine-tuning's {full.peak_bytes / 2**20:.1f} MiB\n")

    by_task = finetune(copy.deepcopy(pretrained), (x0,), memory_limit=budget, data=batches[:N_DATA_BATCHES],
                       loss_fn=task.loss_fn, probe_lr=LR)
    print(by_task, "\n")
    by_budget = finetune(copy.deepcopy(pretrained), (x0,), memory_limit=budget, loss_fn=step_loss)
    scored = {}
    for name, plan in (("by the task's probes", by_task), ("by budget alone", by_budget)):
        measured = measure_step(plan.module, (x0,), loss_fn=step_loss).peak_bytes
        if plan.trainable not in scored:     # the same tensors from the same weights train the same (one thread)
            scored[plan.trainable] = train_and_score(plan.module, task, batches, test)
        accuracy = scored[plan.trainable]
        print(f"{name:22s} trains {plan.candidate.describe():45s} measured peak {measured / 2**20:5.1f} MiB "
              f"(limit {budget / 2**20:.1f}); test accuracy after {STEPS} steps {accuracy:.1%} (chance 50%)")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    run("recoded")
