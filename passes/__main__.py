"""``python -m passes``: the cost table of a built-in small GPT (training step, AdamW)."""
import argparse

from . import estimate
from .zoo import tiny_gpt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m passes", description=__doc__)
    parser.add_argument("--device", default="h100", help="h100, h200, a100 or cpu (measured); default h100")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the built-in GPT (default 4)")
    parser.add_argument("--per-node", action="store_true", help="one row per graph node instead of per module")
    args = parser.parse_args(argv)
    model, inputs = tiny_gpt(n_layers=args.layers)
    est = estimate(model, inputs, training=True, optimizer="adamw", device=args.device)
    print(est.report(per_node=args.per_node))


if __name__ == "__main__":
    main()
