"""Render a cluster job spec from deploy/ with a run's config, workdir and overrides.

  python scripts/render_job.py slurm    --config configs/resnet50v2.py --workdir /shared/runs/r50 \
      --hosts 4 [--config.data.root=/shared/images ...] --out train.sbatch
  python scripts/render_job.py k8s      ... --image REGISTRY/facejax:cuda --out train-job.yaml
  python scripts/render_job.py k8s-eval ... --out eval-job.yaml   (export -> build_index -> eval)
  python scripts/render_job.py k8s-tpu  ... --tpu_accelerator tpu-v5-lite-podslice --out js.yaml
  python scripts/render_job.py tpu      ... --repo_url https://github.com/ORG/facejax.git

The config and overrides are checked here (an unknown key fails now, not on the cluster).
Without --out the spec goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facejax import cli, config
from facejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = {
    "slurm": "deploy/slurm/train.sbatch",
    "k8s": "deploy/k8s/train-job.yaml",
    "k8s-eval": "deploy/k8s/eval-job.yaml",
    "k8s-tpu": "deploy/k8s/tpu-jobset.yaml",
    "tpu": "deploy/tpu/train.sh",
}
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$")
_PLAIN = re.compile(r"^[\w.:/@-]+$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def train_argv(python: str, cfg_path: str, workdir: str, overrides: list[str]) -> list[str]:
    """The training command every host runs (the scheduler adds only the environment)."""
    return [python, "scripts/train.py", "--config", cfg_path, "--workdir", workdir] + [
        f"--config.{o}" for o in overrides]


def eval_argvs(python: str, workdir: str) -> list[list[str]]:
    """export -> build_index -> eval_topk on the trained run (config.json holds the overrides)."""
    return [[python, "scripts/export.py", "--workdir", workdir],
            [python, "scripts/build_index.py", "--workdir", workdir, "--no_progress"],
            [python, "scripts/eval_topk.py", "--workdir", workdir, "--no_progress"]]


def _shell(argvs: list[list[str]], prefix: str = "") -> str:
    return " && ".join(prefix + shlex.join(a) for a in argvs)


def check_args(args) -> None:
    """One ConfigError per parameter a scheduler would reject later, or worse, accept."""
    if not 1 <= args.hosts <= 4096:
        raise ConfigError(f"--hosts {args.hosts} must be in 1..4096")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1..65535")
    if not _DNS_LABEL.match(args.name):
        raise ConfigError(f"--name {args.name!r} must be a DNS label (a Kubernetes name, also "
                          f"used in shell lines): lower-case letters, digits and '-', starting "
                          f"with a letter, at most 42 characters (pod names append an index)")
    for flag in ("time", "image", "pvc", "storage", "tpu_accelerator", "tpu_topology", "zone",
                 "tpu_type", "tpu_runtime"):
        value = getattr(args, flag)
        if not _PLAIN.match(value):
            raise ConfigError(f"--{flag} {value!r}: use letters, digits and . _ : / @ - only")
    if args.kind.startswith("k8s"):
        for flag, value in (("--workdir", args.workdir), ("--mount", args.mount)):
            if not os.path.isabs(value):
                raise ConfigError(f"{flag} {value!r} must be an absolute path in the container")
        mount = os.path.normpath(args.mount)
        if os.path.commonpath([mount, os.path.normpath(args.workdir)]) != mount:
            raise ConfigError(f"--workdir {args.workdir} is not under the shared volume's "
                              f"--mount {args.mount}: the hosts would not share it")
    if args.kind == "tpu" and not args.repo_url:
        raise ConfigError("tpu: pass --repo_url, the git URL the TPU workers clone facejax from")


def render(args, overrides: list[str]) -> str:
    check_args(args)
    config.load_config(args.config, overrides)  # an unknown key or bad value fails here
    k8s = args.kind.startswith("k8s")
    python = "python" if k8s else args.python
    train = train_argv(python, args.config, args.workdir, overrides)
    evals = eval_argvs(python, args.workdir)
    values = dict(
        name=args.name, hosts=str(args.hosts), port=str(args.port), image=args.image,
        gpus_per_host=str(args.gpus_per_host), cpus_per_host=str(args.cpus_per_host),
        time=args.time, pvc=args.pvc, storage=args.storage, mount=args.mount,
        tpu_accelerator=args.tpu_accelerator, tpu_topology=args.tpu_topology,
        chips_per_host=str(args.chips_per_host), zone=args.zone, tpu_type=args.tpu_type,
        tpu_runtime=args.tpu_runtime,
        train_argv_json=json.dumps(train),
        eval_argv_json=json.dumps(["bash", "-c", _shell(evals)]),
    )
    if args.kind == "slurm":
        values["train_cmd"] = shlex.join(["env", "FACEJAX_DISTRIBUTED=slurm",
                                          f"JAX_COORDINATOR_PORT={args.port}"] + train)
        values["eval_cmd_quoted"] = shlex.quote(_shell(evals))
    if args.kind == "tpu":
        cd = "cd facejax && "
        values["setup_cmd_quoted"] = shlex.quote(
            f"(git clone {shlex.quote(args.repo_url)} facejax || git -C facejax pull --ff-only)"
            f" && {cd}python3 -m venv .venv && .venv/bin/pip install -e \".[tpu]\"")
        values["train_cmd_quoted"] = shlex.quote(cd + "FACEJAX_DISTRIBUTED=auto "
                                                 + shlex.join(train))
        # Worker 0 alone: on the CPU, as one host of a slice cannot open the TPU by itself.
        export, index, evaluate = evals
        values["export_cmd_quoted"] = shlex.quote(cd + _shell([export], "JAX_PLATFORMS=cpu "))
        values["index_cmd_quoted"] = shlex.quote(cd + _shell([index], "FACEJAX_DISTRIBUTED=auto "))
        values["eval_cmd_quoted"] = shlex.quote(cd + _shell([evaluate], "JAX_PLATFORMS=cpu "))
    with open(os.path.join(ROOT, TEMPLATES[args.kind])) as f:
        template = f.read()
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:  # a template and this script out of step: a bug, not bad input
        raise AssertionError(f"{TEMPLATES[args.kind]}: no value for {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(TEMPLATES))
    p.add_argument("--config", required=True, help="config file, relative to the checkout")
    p.add_argument("--workdir", required=True, help="run folder on the shared filesystem")
    p.add_argument("--hosts", type=int, default=2, help="processes (nodes / pods / TPU hosts)")
    p.add_argument("--port", type=int, default=1234, help="the coordinator's port")
    p.add_argument("--name", default="facejax-train", help="job name")
    p.add_argument("--out", default="", help="file to write (default: stdout)")
    p.add_argument("--python", default=".venv/bin/python", help="slurm/tpu: the interpreter")
    p.add_argument("--gpus_per_host", type=int, default=8)
    p.add_argument("--cpus_per_host", type=int, default=16)
    p.add_argument("--time", default="24:00:00", help="slurm: the time limit")
    p.add_argument("--image", default="facejax:cuda", help="k8s: the container image")
    p.add_argument("--pvc", default="facejax-runs", help="k8s: the shared volume's claim")
    p.add_argument("--storage", default="500Gi", help="k8s: the claim's size")
    p.add_argument("--mount", default="/workdir", help="k8s: where the volume is mounted")
    p.add_argument("--tpu_accelerator", default="tpu-v5-lite-podslice", help="k8s-tpu")
    p.add_argument("--tpu_topology", default="4x4", help="k8s-tpu")
    p.add_argument("--chips_per_host", type=int, default=4, help="k8s-tpu")
    p.add_argument("--zone", default="us-central2-b", help="tpu")
    p.add_argument("--tpu_type", default="v4-16", help="tpu: the accelerator type")
    p.add_argument("--tpu_runtime", default="tpu-ubuntu2204-base", help="tpu: the VM image")
    p.add_argument("--repo_url", default="", help="tpu: git URL the workers clone")
    return p


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    args = parser().parse_args(rest)
    text = render(args, overrides)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        if args.kind in ("slurm", "tpu"):
            os.chmod(args.out, 0o755)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    cli.run(main)
