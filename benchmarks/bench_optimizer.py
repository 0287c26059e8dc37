"""The Adam step of the fit: PyTorch's three implementations, timed and with their aten op counts.

The online fit's step is launch-bound on a GPU at small batches (``online.md``: ~2,000–3,300 aten ops per
iteration, each at least one kernel launch). Adam's step is one part of it: PyTorch offers a per-parameter loop
(``foreach=False``), multi-tensor ``foreach`` kernels (its CUDA default) and one ``fused`` kernel per dtype and
device. This script builds the parameters the engines train — the paper's U-Net 64/5 with LoRA rank 4 (the shipped
chain's warm start) and the same U-Net with every weight trained (random initialisation) — gives them gradients,
and measures each variant's step: seconds (median of ``--repeats`` after a warm-up) and aten ops (a dispatch
counter, the launches an eager GPU step makes). Each variant's parameters after the steps are compared with the
loop's (max abs difference), so a faster variant is known to compute the same update.

Writes ``benchmarks/results/optimizer.json`` and ``optimizer.md`` (``optimizer_gpu.*`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from bench_online import RESULTS, OpCounter  # the script's directory is on the path when run as a script

VARIANTS: dict[str, dict[str, bool]] = {
    "loop (foreach=False)": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _network(lora: bool, device: torch.device) -> torch.nn.Module:
    from semrecon_core.backbones.lora import apply_lora
    from semrecon_core.backbones.unet import UNet, UNetSpec

    torch.manual_seed(0)
    network = UNet(UNetSpec(width=64, depth=5))
    if lora:
        apply_lora(network, 4)
    return network.to(device)


def measure(lora: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    """Every variant's step on the trainable parameters of the network (``lora``: LoRA 4 on the warm start)."""
    base = _network(lora, device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    grads = [
        torch.randn(p.shape, generator=generator).to(device) if p.requires_grad else None for p in base.parameters()
    ]
    out: dict[str, Any] = {"tensors": 0, "parameters": 0, "variants": {}}
    reference: list[torch.Tensor] | None = None
    for name, options in VARIANTS.items():
        network = copy.deepcopy(base)
        params = [p for p in network.parameters() if p.requires_grad]
        for p, g in zip(network.parameters(), grads, strict=True):
            if g is not None:
                p.grad = g.clone()
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), **options)
        seconds = []
        for _ in range(repeats + 1):  # the first is a warm-up (state allocation)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
        counter = OpCounter()
        with counter:
            optimizer.step()
        final = [p.detach().clone() for p in params]
        reference = reference or final
        difference = max(float((a - b).abs().max()) for a, b in zip(final, reference, strict=True))
        out["tensors"], out["parameters"] = len(params), sum(p.numel() for p in params)
        out["variants"][name] = {
            "median_s": statistics.median(seconds[1:]),
            "ops": counter.count,
            "max_abs_difference_vs_loop": difference,
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown."""
    lines = [
        f"# Adam step of the fit: loop vs foreach vs fused ({result['device']})",
        "",
        (
            f"Written by `{result['command']}` on {result['machine']} ({result['threads']} thread(s); torch "
            f"{result['torch']}). Median of {result['repeats']} steps after a warm-up; ops counted on one more step."
        ),
        "",
        "| parameters trained | tensors | values | variant | median step (ms) | aten ops | max abs diff vs loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, block in result["cases"].items():
        for name, v in block["variants"].items():
            lines.append(
                f"| {case} | {block['tensors']} | {block['parameters']:,} | {name} | {1e3 * v['median_s']:.2f} | "
                f"{v['ops']} | {v['max_abs_difference_vs_loop']:.1e} |"
            )
    lines += ["", *result["notes"], ""]
    return "\n".join(lines)


def main() -> int:
    """Measure (see the module docstring) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = {
        "U-Net 64/5, LoRA rank 4 (warm start, the shipped chain)": measure(True, device, args.repeats),
        "U-Net 64/5, every weight (random initialisation)": measure(False, device, args.repeats),
    }
    notes = [
        (
            "Each aten op of an eager step is at least one kernel launch on a GPU, where `online.md` costs a launch at "
            "about 5 µs. The fits use the fused variant on the CPU and on CUDA (`semrecon_core/solvers/adam.py`, "
            "`adam_optimizer`)."
        )
    ]
    if device.type == "cpu":
        notes.append("Measured on the CPU: the seconds say nothing about a GPU; the op counts carry over.")
    result = {
        "command": "python3 benchmarks/bench_optimizer.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "threads": args.threads,
        "torch": torch.__version__,
        "device": args.device,
        "repeats": args.repeats,
        "cases": cases,
        "notes": notes,
    }
    name = "optimizer_gpu" if device.type == "cuda" else "optimizer"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
