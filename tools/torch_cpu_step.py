"""PyTorch's CPU training step, for side-by-side timing with bcjax (tools/cpu_step_bench.py).

Runs in a separate Python that has torch (not a bcjax dependency; torchvision
only for mobilenet_v2), e.g. a virtual environment made for it:

    $TORCH_VENV/bin/python tools/torch_cpu_step.py --model resnet18 --width 64 --size 64

What a PyTorch user gets by default: eager, float32, NCHW, BatchNorm in train mode,
cross-entropy, SGD with momentum 0.9, random data. ResNet-18 at stem width 64 is
torchvision's resnet18; other widths keep its layout at stage widths w, 2w, 4w, 8w;
mobilenet_v2 is torchvision's (width 1.0, dropout 0.2).

Protocol (so that a driver can alternate it with other work): after set-up and
--warmup steps it prints one JSON line {"ready": ...}; then for every line "N"
read from stdin it runs N steps and prints {"step_s": [...]}; it exits on EOF.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (two 3x3 convs, projection shortcut when the
    shape changes), written out so that ResNet-18 needs torch alone."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


def resnet18(width: int, num_classes: int) -> nn.Module:
    """torchvision's resnet18 (same modules, order and initialisation) at stage
    widths w, 2w, 4w, 8w; width 64 is torchvision's own."""

    def stage(cin, cout, stride):
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))

    w = width
    model = nn.Sequential(
        nn.Conv2d(3, w, 7, 2, 3, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        stage(w, w, 1),
        stage(w, 2 * w, 2),
        stage(2 * w, 4 * w, 2),
        stage(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, num_classes),
    )
    for m in model.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build(name: str, width: int, num_classes: int) -> nn.Module:
    if name == "resnet18":
        return resnet18(width, num_classes)
    if name == "mobilenet_v2":
        import torchvision  # only this model needs it

        return torchvision.models.mobilenet_v2(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18", choices=("resnet18", "mobilenet_v2"))
    p.add_argument("--width", type=int, default=64, help="ResNet stem width")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a.model, a.width, 3).train()
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 3, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    print(
        json.dumps(
            {
                "ready": True,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "params": sum(q.numel() for q in model.parameters()),
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"step_s": times}), flush=True)


if __name__ == "__main__":
    main()
