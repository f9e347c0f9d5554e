"""Learning-rate finder (fastai lr_find): loss vs an exponential LR sweep, plot and suggestion.

  python scripts/lr_find.py --config configs/resnet18.py --workdir runs/r18_lr \
      --config.data.root=/path/to/images [--start-lr 1e-7 --end-lr 10 --steps 100]

Writes WORKDIR/lr_find.png and WORKDIR/lr_find.json; trains nothing that is kept.
"""

from __future__ import annotations

import argparse

from facejax import cli, config


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--workdir", required=True, help="where the plot and JSON go")
    parser.add_argument("--start-lr", type=float, default=1e-7)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(rest)
    cfg = config.load_config(args.config, overrides)

    from facejax.train.mesh import initialize_distributed
    initialize_distributed()
    from facejax.train.lr_find import lr_find
    result = lr_find(cfg, args.workdir, start_lr=args.start_lr, end_lr=args.end_lr,
                     num_steps=args.steps)
    def fmt(name):
        return "n/a (too few steps before divergence)" if result[name] is None else \
            f"{result[name]:.2e}"

    print(f"{len(result['lrs'])} steps; suggested LR (steepest descent) {fmt('steep')}, "
          f"valley {fmt('valley')}, minimum/10 {fmt('minimum')}")
    print(f"plot: {args.workdir}/lr_find.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
