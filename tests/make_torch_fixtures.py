"""Write tests/fixtures/torch/ with real torch (``pip install torch==2.13.0``): ``python tests/make_torch_fixtures.py``.

Each model's state_dict (keys verbatim, BatchNorm statistics randomised) as .safetensors, an input
and torch's eval outputs, and AdamW / SGD-momentum states after two steps with the gradient of the
third step and the params after it. The suite reads these without torch.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from torch_models import Decoder, ResNet18, SmallCNN

OUT = Path(__file__).resolve().parent / "fixtures" / "torch"


def numpy(tree):
    return {k: v.detach().cpu().numpy().copy() for k, v in tree.items()}


def randomise_statistics(model, generator):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


def write_model(name, model, x, generator):
    with torch.no_grad():
        randomise_statistics(model, generator)
        model.eval()
        y = model(x)
    save_file(numpy(model.state_dict()), OUT / f"{name}.safetensors")
    np.savez(OUT / f"{name}_io.npz", x=x.numpy(), y=y.numpy(), keys=np.array(list(model.state_dict())))  # safetensors sorts keys


def write_optimizer(name, make, generator):
    torch.manual_seed(3)
    model = SmallCNN()
    opt = make(model.parameters())
    xs = [torch.randn(4, 1, 4, 4, generator=generator) for _ in range(3)]

    def grads(x):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()

    for x in xs[:2]:
        grads(x)
        opt.step()
    state = opt.state_dict()  # its tensors are the optimiser's own: copied now, before the third step
    arrays = {f"params.{k}": v for k, v in numpy(model.state_dict()).items()}
    for i, entry in state["state"].items():
        arrays |= {f"state.{i}.{k}": v.numpy().copy() for k, v in entry.items()}
    model.eval()
    with torch.no_grad():  # the outputs of the params the state is saved with
        x, y = xs[2].numpy(), model(xs[2]).numpy()
    model.train()
    grads(xs[2])  # in training mode, as the two steps before it (its BatchNorm statistics move on)
    arrays |= {f"grads.{k}": p.grad.numpy().copy() for k, p in model.named_parameters()}
    opt.step()
    arrays |= {f"after.{k}": v for k, v in numpy(model.state_dict()).items()}
    arrays["x"], arrays["y"] = x, y
    save_file(arrays, OUT / f"{name}.safetensors")
    groups = [{k: v for k, v in g.items() if isinstance(v, (int, float, bool, list, tuple)) or v is None}
              for g in state["param_groups"]]
    keys = list(model.state_dict())  # torch's order, which safetensors does not keep
    (OUT / f"{name}.json").write_text(json.dumps({"param_groups": groups, "keys": keys}, indent=1) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    write_model("resnet18", ResNet18(num_classes=10, width=8), torch.randn(2, 3, 32, 32, generator=generator), generator)
    torch.manual_seed(1)
    write_model("decoder", Decoder(), torch.tensor([1, 7, 3]), generator)
    write_optimizer("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2), generator)
    write_optimizer("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), generator)


if __name__ == "__main__":
    main()
