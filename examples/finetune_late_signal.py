"""Fine-tune where the task's signal sits late: the probes score the first block lowest.

The same pretrained classifier as ``finetune_early_signal.py`` (it reads a bit off each of
its first two tokens). The target task keeps the inputs and asks for the XOR of the two
bits: the blocks already carry both bits, and what is missing is a non-linear combination
of them on top, which any block after the first can learn and the linear head alone cannot.
The probes find the later blocks equally good (each removes nearly all the loss) and the
first one worth less; the block trained in full is a later one. Since any one of the later
blocks is enough, the rest of the budget goes to small adapters wherever it fits (on this
model that can include the first block: the choice maximises the summed probe scores, and
past the loss left to remove more parts are a tie, broken towards the larger sum).

    python examples/finetune_late_signal.py       # about 2 minutes on 2 CPU cores
"""
from finetune_early_signal import run

if __name__ == "__main__":
    run("xor")
