"""Decode a dataset once into the cache and print what the splits hold.

  python scripts/prepare_data.py --config configs/demo.py --config.data.root=/path/to/images
"""

from __future__ import annotations

import argparse

from facejax import cli, config
from facejax.data.prepare import prepare_data


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    args = parser.parse_args(rest)
    cfg = config.load_config(args.config, overrides)
    print(prepare_data(cfg.data).summary())
    return 0


if __name__ == "__main__":
    cli.run(main)
