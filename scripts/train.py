"""Train a model from a config; rerunning the same command resumes from the latest checkpoint.

  python scripts/train.py --config configs/demo.py --workdir runs/demo [--config.a.b=value ...]

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS=host0:port,
JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (see README).
"""

from __future__ import annotations

import argparse

from facejax import cli, config


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=cli.overrides_epilog(
            "--config.data.root=/path/to/images --config.train.batch_size=32 "
            "--config.train.learning_rate=1e-4"))
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--workdir", required=True, help="run folder (created; resumed if present)")
    args = parser.parse_args(rest)
    cfg = config.load_config(args.config, overrides)

    from facejax.train.mesh import initialize_distributed  # before any jax backend starts
    if not initialize_distributed():
        # On CPU, one host device per core with the batch split over them (JAX_NUM_CPU_DEVICES
        # or XLA_FLAGS' device count, when set, win; JAX_NUM_CPU_DEVICES=1 turns it off).
        from facejax.train.host_devices import use_host_devices
        use_host_devices(cfg.train.batch_size)
    from facejax.train.loop import train_and_evaluate
    train_and_evaluate(cfg, args.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
