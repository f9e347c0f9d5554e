"""Decode a dataset once into the cache and print what the splits hold.

  python scripts/prepare_data.py --config configs/demo.py --config.data.root=/path/to/images
      [--prune_cache]   # also delete older cache entries of these files and settings
"""

from __future__ import annotations

import argparse

from facejax import cli, config
from facejax.data.prepare import prepare_data


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--prune_cache", action="store_true",
                        help="delete the cache entries of older states of these files (same "
                             "decode settings); a run still training on them would fail")
    args = parser.parse_args(rest)
    cfg = config.load_config(args.config, overrides)
    print(prepare_data(cfg.data, prune_cache=args.prune_cache).summary())
    return 0


if __name__ == "__main__":
    cli.run(main)
