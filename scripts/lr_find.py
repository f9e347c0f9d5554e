"""Learning-rate finder (fastai lr_find): loss vs an exponential LR sweep, plot and suggestion.

  python scripts/lr_find.py --config configs/resnet18.py --workdir runs/r18_lr \
      --config.data.root=/path/to/images [--start-lr 1e-7 --end-lr 10 --steps 100]

Writes WORKDIR/lr_find.png and WORKDIR/lr_find.json; trains nothing that is kept. It ends with
the learning rate to train with and the flag that takes it (--config.train.learning_rate).
"""

from __future__ import annotations

import argparse

from facejax import cli, config


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=cli.overrides_epilog("--config.data.root=/path/to/images"))
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--workdir", required=True, help="where the plot and JSON go")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first LR of the sweep")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last LR of the sweep")
    parser.add_argument("--steps", type=int, default=100, help="training steps in the sweep")
    args = parser.parse_args(rest)
    cfg = config.load_config(args.config, overrides)

    from facejax.train.mesh import initialize_distributed
    initialize_distributed()
    from facejax.train.lr_find import advice, lr_find
    result = lr_find(cfg, args.workdir, start_lr=args.start_lr, end_lr=args.end_lr,
                     num_steps=args.steps)
    print(advice(result, args.config, args.workdir, float(cfg.train.learning_rate)))
    return 0


if __name__ == "__main__":
    cli.run(main)
