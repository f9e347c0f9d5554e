"""Training throughput (images/s: augment + forward + backward + Adam update) vs torchvision.

  .venv/bin/python bench/train_throughput.py            # CPU: ResNet18/50 x 112/224, batch 32
  .venv/bin/python bench/train_throughput.py --models resnet18 --sizes 112 --rounds 2
  .venv/bin/python bench/train_throughput.py --gpu              # what bench/gpu.sh runs
  .venv/bin/python bench/train_throughput.py --models scratch_cnn --sizes 64 112 --before-pool
  XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python \
      bench/train_throughput.py --models scratch_cnn resnet18 --sizes 112 --meshes 1

`scratch_cnn` is the paper's Table 1 CNN (configs/scratch_cnn.py: dropout 0.5, [0, 1] inputs)
against the same layers written in torch (`torch_scratch_cnn`; equal parameter counts are
asserted). `--meshes 1` also times facejax with the batch on 1 of the process's host devices
(the one-device step) beside the all-devices one, in the same interleaved rounds.

CPU mode times facejax's jitted train step (the real one: on-device random affine + flip +
normalisation, float32, Adam) and torchvision's model + torch.optim.Adam with an equivalent
batched augmentation (per-image random affine through `affine_grid`/`grid_sample`, flip,
normalisation) on the same batch size and resolution, in the same process. Rounds alternate
between the two so a busy machine slows both alike; each figure is the median over rounds.

GPU mode: ResNet50 at 224 px with bfloat16 compute at the largest batch of --gpu-batches that
fits, plus input-pipeline headroom (grain iterator over a uint8 array -> sharded device batch
-> jitted augmentation, no model), so the two can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from facejax import cli
from facejax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
CLASSES = 100


def _config(model: str, size: int, batch: int, dtype: str = "float32", remat: str = "none"):
    if model == "scratch_cnn":  # the paper's Table 1 CNN, its own config (dropout 0.5, [0, 1])
        return load_config(os.path.join(ROOT, "configs", "scratch_cnn.py"), [
            f"model.input_size={size}", f"data.image_size={size}", f"train.batch_size={batch}",
            "train.schedule=constant", f"train.compute_dtype={dtype}", f"train.remat={remat}"])
    return load_config(os.path.join(ROOT, "configs", "resnet18.py"), [
        f"model.name={model}", "model.pretrained=", "model.weights_source=torchvision",
        f"model.input_size={size}", f"data.image_size={size}", f"train.batch_size={batch}",
        "train.schedule=constant", "train.finetune=all", f"train.compute_dtype={dtype}",
        f"train.remat={remat}"])


# --also: facejax variants timed in the same interleaved rounds -> (compute dtype, remat,
# XLA's own convolutions instead of models/conv.py's: the step before that module)
VARIANTS = {"bf16": ("bfloat16", "none", False), "remat_dots": ("float32", "dots", False),
            "bf16_remat_dots": ("bfloat16", "dots", False),
            "xla_conv": ("float32", "none", True)}


def jax_stepper(model: str, size: int, batch: int, dtype: str = "float32",
                devices: int | None = None, remat: str = "none", xla_conv: bool = False):
    """A function running one facejax train step on a fixed uint8 batch (blocks until done),
    its batch split over the first `devices` devices (default: all). `step.temp_bytes` is the
    compiled step's temporary memory (XLA's memory analysis; activations live there)."""
    import jax

    from facejax.data.pipeline import to_global
    from facejax.sharding import make_data_mesh
    from facejax.train import state as state_lib
    from facejax.train.losses import LossConfig
    from facejax.train.mesh import replicate
    from facejax.train.step import jit_train_step

    config = _config(model, size, batch, dtype, remat)
    mesh = make_data_mesh(None if devices is None else jax.devices()[:devices])
    net = state_lib.build_model(config, CLASSES, dtype=state_lib.compute_dtype(dtype))
    if xla_conv:
        from flax import nnx
        from jax import lax
        for _, node in nnx.iter_graph(net):
            if isinstance(node, nnx.Conv):
                node.conv_general_dilated = lax.conv_general_dilated
    state, bundle, tx, _ = state_lib.create_train_state(config, net, steps_per_epoch=100,
                                                        total_steps=100)
    fn = jit_train_step(mesh, bundle=bundle, tx=tx, loss_cfg=LossConfig.from_config(config),
                        augment_cfg=config.augment, freeze_bn=False)
    holder = {"state": replicate(state, mesh), "params": _count(state.params)}
    key = replicate(jax.random.key_data(jax.random.key(0)), mesh)
    rng = np.random.default_rng(0)
    batch_np = dict(image=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                    label=rng.integers(0, CLASSES, batch).astype(np.int32))
    device_batch = to_global(batch_np, mesh)

    def step():
        holder["state"], metrics = fn(holder["state"], device_batch, key)
        metrics["loss"].block_until_ready()

    step.params = holder["params"]
    try:
        step.temp_bytes = int(fn.lower(holder["state"], device_batch, key).compile()
                              .memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (a backend without memory analysis)
        step.temp_bytes = None
    return step


def _count(tree) -> int:
    import jax
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def torch_scratch_cnn(size: int, classes: int, filters=(32, 64, 128)):
    """Table 1 in torch: the same layers as facejax.models.cnn.ScratchCNN + the shared head."""
    import torch.nn as nn

    layers, cin, side = [], 3, size
    for f in filters:
        layers += [nn.Conv2d(cin, f, 3, padding=1), nn.ReLU(),
                   nn.BatchNorm2d(f, eps=1e-3, momentum=0.1),
                   nn.Conv2d(f, f, 3), nn.ReLU(), nn.MaxPool2d(2)]
        cin, side = f, (side - 2) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(side * side * cin, classes))


def torch_stepper(model: str, size: int, batch: int):
    """The torchvision + torch.optim peer, with an equivalent batched augmentation."""
    import torch
    import torch.nn.functional as F
    import torchvision

    if model == "scratch_cnn":
        net = torch_scratch_cnn(size, CLASSES)
        mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)  # 'unit': [0, 1] inputs
    else:
        net = getattr(torchvision.models, model)(weights=None, num_classes=CLASSES)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, CLASSES, batch))

    def augment(x):
        # Rotation +-10 deg, zoom +-10 %, shift +-5 %, horizontal flip: one warp per image.
        n = x.shape[0]
        angle = (torch.rand(n) * 2 - 1) * np.deg2rad(10)
        scale = 1 + (torch.rand(n, 2) * 2 - 1) * 0.1
        flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * scale[:, 1] * flip, -sin * scale[:, 0],
                                          (torch.rand(n) * 2 - 1) * 0.1], 1),
                             torch.stack([sin * scale[:, 1] * flip, cos * scale[:, 0],
                                          (torch.rand(n) * 2 - 1) * 0.1], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def step():
        x = (augment(images.float() / 255.0) - mean) / std
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        opt.step()

    step.params = sum(p.numel() for p in net.parameters())
    return step


def _time(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def _reduce_window_pool_stepper(size: int, batch: int):
    """The scratch CNN's step as before facejax.models.pooling: flax's max_pool (its gradient is
    XLA's select_and_scatter). Traced and compiled here, under the patch."""
    from flax import nnx

    from facejax.models import cnn

    fast = cnn.max_pool_2x2
    cnn.max_pool_2x2 = lambda x: nnx.max_pool(x, (2, 2), (2, 2), "VALID")
    try:
        step = jax_stepper("scratch_cnn", size, batch)
        step()
    finally:
        cnn.max_pool_2x2 = fast
    return step


def compare(models, sizes, batch: int, rounds: int, steps: int,
            before_pool: bool = False, meshes: list[int] | None = None,
            also: list[str] | None = None) -> list[dict]:
    import jax
    import torch

    rows = []
    for model in models:
        for size in sizes:
            peers = {"facejax": jax_stepper(model, size, batch), "torch": torch_stepper(
                model, size, batch)}
            for n in meshes or []:  # the same process, the batch split over n of its devices
                peers[f"facejax_mesh{n}"] = jax_stepper(model, size, batch, devices=n)
            for v in also or []:
                dtype, remat, xla_grad = VARIANTS[v]
                peers[f"facejax_{v}"] = jax_stepper(model, size, batch, dtype=dtype, remat=remat,
                                                    xla_conv=xla_grad)
            if model == "scratch_cnn":  # the same network: the same number of parameters
                assert peers["facejax"].params == peers["torch"].params, (
                    peers["facejax"].params, peers["torch"].params)
                if before_pool:
                    peers["facejax_reduce_window_pool"] = _reduce_window_pool_stepper(size, batch)
            for step in peers.values():  # compile / warm up
                step()
            rates = {name: [] for name in peers}
            for _ in range(rounds):
                for name, step in peers.items():
                    rates[name].append(steps * batch / _time(step, steps))
            row = dict(model=model, size=size, batch=batch,
                       facejax=statistics.median(rates["facejax"]),
                       torch=statistics.median(rates["torch"]),
                       load=os.getloadavg()[0])
            row["ratio"] = row["facejax"] / row["torch"]
            for n in meshes or []:
                row[f"mesh{n}"] = statistics.median(rates[f"facejax_mesh{n}"])
                print(f"  {model} {size}px, batch over {n} of {jax.device_count()} devices: "
                      f"{row[f'mesh{n}']:.1f} img/s ({row[f'mesh{n}'] / row['torch']:.2f}x torch)",
                      flush=True)
            row["temp_mb"] = _mb(peers["facejax"].temp_bytes)
            for v in also or []:
                row[v] = statistics.median(rates[f"facejax_{v}"])
                row[f"{v}_temp_mb"] = _mb(peers[f"facejax_{v}"].temp_bytes)
                print(f"  {model} {size}px {v}: {row[v]:.1f} img/s ({row[v] / row['torch']:.2f}x "
                      f"torch, {row[v] / row['facejax']:.2f}x facejax float32); compiled temp "
                      f"memory {row[f'{v}_temp_mb']} MB vs {row['temp_mb']} MB", flush=True)
            if "facejax_reduce_window_pool" in peers:
                row["before"] = statistics.median(rates["facejax_reduce_window_pool"])
                print(f"  {model} {size}px before (flax max_pool): {row['before']:.1f} img/s "
                      f"({row['before'] / row['torch']:.2f}x torch)", flush=True)
            rows.append(row)
            print(f"  {model} {size}px: facejax {row['facejax']:.1f} img/s, torch "
                  f"{row['torch']:.1f} img/s ({row['ratio']:.2f}x), load {row['load']:.1f}",
                  flush=True)
    print(f"\njax {jax.__version__} ({jax.device_count()} x {jax.devices()[0].platform}), "
          f"torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {len(os.sched_getaffinity(0))} cores")
    print("\n| model | px | batch | facejax img/s | torch img/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['facejax']:.1f} | "
              f"{r['torch']:.1f} | {r['ratio']:.2f}x |")
    return rows


def _mb(n):
    return None if n is None else round(n / 2**20, 1)


def gpu(batches, steps: int, model: str = "resnet50", size: int = 224,
        pipeline_seconds: float = 10.0, remat: str = "none") -> dict:
    """`model` at `size` px, bf16, at the largest batch that fits, plus input-pipeline headroom."""
    import jax

    from facejax.data import augment as aug
    from facejax import sharding
    from facejax.data import pipeline

    out = dict(device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
               jax=jax.__version__, model=model, size=size, compute_dtype="bfloat16",
               remat=remat)
    for batch in batches:
        try:
            step = jax_stepper(model, size, batch, dtype="bfloat16", remat=remat)
            t0 = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t0
            _time(step, 3)
            dt = _time(step, steps)
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"  batch {batch}: out of memory, trying a smaller one", flush=True)
            continue
        out.update(train_batch=batch, train_images_per_s=steps * batch / dt,
                   compile_s=compile_s)
        print(f"  {model} {size}px bf16 batch {batch}: {steps * batch / dt:,.0f} images/s "
              f"(first step incl. compile {compile_s:.0f}s)", flush=True)
        break
    batch = out.get("train_batch", batches[-1])
    n = max(4 * batch, 4096)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    cfg = _config(model, size, batch).augment
    it = pipeline.TrainIterator(images, np.arange(n), np.zeros(n, np.int32), batch_size=batch,
                                seed=0)
    mesh = sharding.make_data_mesh()
    fn = jax.jit(lambda k, x: aug.preprocess_train(k, x, cfg, size, "torch"))
    key = jax.random.key(0)
    for _ in range(3):
        fn(key, pipeline.to_global(next(it), mesh)["image"]).block_until_ready()
    count, t0, pending = 0, time.perf_counter(), None
    while time.perf_counter() - t0 < pipeline_seconds:
        x = fn(jax.random.fold_in(key, count), pipeline.to_global(next(it), mesh)["image"])
        if pending is not None:
            pending.block_until_ready()
        pending, count = x, count + 1
    pending.block_until_ready()
    out["pipeline_images_per_s"] = count * batch / (time.perf_counter() - t0)
    it.close()
    if "train_images_per_s" in out:
        out["pipeline_headroom"] = out["pipeline_images_per_s"] / out["train_images_per_s"]
    print(f"  input pipeline (grain -> device -> augment, batch {batch}): "
          f"{out['pipeline_images_per_s']:,.0f} images/s"
          + (f", {out['pipeline_headroom']:.1f}x the training rate"
             if "pipeline_headroom" in out else ""), flush=True)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per round (CPU mode)")
    parser.add_argument("--before-pool", action="store_true",
                        help="also time the scratch CNN with flax's max_pool (before)")
    parser.add_argument("--meshes", type=int, nargs="*", default=[],
                        help="also time facejax with the batch over the first N devices (run "
                             "with --xla_force_host_platform_device_count in XLA_FLAGS)")
    parser.add_argument("--also", nargs="*", default=[], choices=list(VARIANTS),
                        help="also time these facejax variants in the same rounds (CPU mode)")
    parser.add_argument("--gpu", action="store_true", help="ResNet50 bf16 + pipeline headroom")
    parser.add_argument("--gpu-remat", default="none", choices=["none", "dots"],
                        help="train.remat for the GPU run")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-model", default="resnet50", help=argparse.SUPPRESS)  # smoke tests
    parser.add_argument("--gpu-size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    if args.gpu:
        result = gpu(args.gpu_batches, args.gpu_steps, args.gpu_model, args.gpu_size,
                     args.pipeline_seconds, remat=args.gpu_remat)
        path = os.path.join(OUT, "train_throughput_gpu" + (
            "" if args.gpu_remat == "none" else f"_remat_{args.gpu_remat}") + ".json")
    else:
        result = compare(args.models, args.sizes, args.batch, args.rounds, args.steps,
                         args.before_pool, args.meshes, args.also)
        path = os.path.join(OUT, "train_throughput_cpu.json")
    with open(path, "w") as f:
        json.dump(dict(date=stamp, result=result), f, indent=1)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
