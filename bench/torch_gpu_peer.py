"""The PyTorch peer for bench/gpu.sh: torchvision ResNet50 training images/s on one GPU.

AMP (bf16 autocast), channels_last, SGD momentum, synthetic uint8 batch augmented on the GPU
(random flip + normalise), at the given batch; the same work facejax's GPU bench times.
    python bench/torch_gpu_peer.py --batch 256 --steps 20
"""

import argparse
import json
import time

import torch
import torchvision


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args()
    dev = "cuda"
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50(num_classes=100).to(dev, memory_format=torch.channels_last)
    if a.compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 100, (a.batch,), device=dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255

    def step():
        x = images.float()
        flip = torch.rand(a.batch, device=dev) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    rate = a.steps * a.batch / (time.perf_counter() - t0)
    res = dict(peer="torch", torch=torch.__version__, batch=a.batch, size=a.size,
               compile=a.compile, images_per_s=rate, gpu=torch.cuda.get_device_name())
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
