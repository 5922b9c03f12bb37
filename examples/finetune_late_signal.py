"""Fine-tune where the task's signal sits late: ``finetune`` reads the task and leaves the first block frozen.

The same pretrained classifier as ``finetune_early_signal.py`` (it reads a bit off each of
its first two tokens). The target task keeps the inputs and asks for the XOR of the two
bits: the blocks already carry both bits, and what is missing is a non-linear combination
of them on top, which a block can learn and the linear head alone cannot. The probes find
that any one block removes nearly all the loss left; one block then trains alone, the one
with the cheapest step: the last, as the common "train the last blocks" recipe would.

    python examples/finetune_late_signal.py       # about 2 minutes on 2 CPU cores
"""
from finetune_early_signal import run

if __name__ == "__main__":
    run("xor")
