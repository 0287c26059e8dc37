"""Benchmark of the semantic encoders and the contrastive loss: time and peak memory per call.

Cases (each in a fresh subprocess so peak memory is its own):

* ``tiny-image`` / ``tiny-language``: the tiny random Janus (``semrecon encoder tiny``), forward+backward
  of the image-only encoder (layers 1/13/24) and of the image-language encoder (final LLM state) to the
  complex input image, one 320×320 slice; median of ``--repeats`` calls after one warm-up.
* ``real-vision``: the real-size Janus-Pro-1B vision tower (SigLIP-L/16, 384 px, 24 layers, hidden 1024)
  with random weights inside ``JanusImageEncoder``; forward+backward to the image. On CPU ONE cold call.
* ``real-llm``: the real-size Janus-Pro-1B LLM (Llama, 24 layers, hidden 2048, 600 prompt tokens) with
  random weights, final state of the last token, backward to the input embeddings; on CPU ONE call.
* ``loss-*``: the contrastive loss alone (forward+backward from features) with real-size banks: pooled
  (3 levels × 1024, 40 P / 40 N), token-PCA (576 tokens, dims 64/128/256, 40 / 40), image-language
  (2048-d, 37 images × K = 100 perturbations on each side).

Writes ``benchmarks/results/encoder.json`` (one entry per device, merged with earlier runs on other
devices) and ``encoder.md``. Ratios compare the loss with the encoder measured in the same run.
Usage: ``python benchmarks/bench_encoder.py [--device cpu|cuda] [--repeats 5] [--skip-llm]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device, repeats: int, warmup: int) -> dict:
    """Median wall time of ``step()`` (seconds) over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "calls": repeats, "warmup": warmup}


def _image(device):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.complex(torch.randn(1, 320, 320, generator=g), torch.randn(1, 320, 320, generator=g)).to(device)


def _encoder_step(encoder, device):
    image = _image(device)

    def step():
        x = image.clone().requires_grad_(True)
        sum(f.float().square().mean() for f in encoder.encode(x)).backward()

    return step


def case_tiny(kind: str, device, repeats: int) -> dict:
    from semrecon_core.encoders.janus import JanusImageEncoder, JanusLanguageEncoder
    from semrecon_core.encoders.tiny import build_tiny_janus

    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_janus(Path(tmp) / "tiny"))
        cls = JanusImageEncoder if kind == "image" else JanusLanguageEncoder
        encoder = cls.from_pretrained(path, device=device)
    return _timed(_encoder_step(encoder, device), device, repeats, warmup=1)


def case_real_vision(device, repeats: int) -> dict:
    import torch
    from transformers import JanusVisionConfig, JanusVisionModel

    from semrecon_core.encoders.janus import JanusImageEncoder

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vision = JanusVisionModel(JanusVisionConfig()).to(device, dtype)  # Janus-Pro-1B vision defaults
    encoder = JanusImageEncoder(vision, name="Janus-Pro-1B vision architecture", revision="random", is_random=True)
    cold = device.type == "cpu"
    result = _timed(_encoder_step(encoder, device), device, 1 if cold else repeats, warmup=0 if cold else 1)
    result["parameters"] = sum(p.numel() for p in vision.parameters())
    return result


def case_real_llm(device, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5632,
        vocab_size=102400,
        max_position_embeddings=16384,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaModel(config).to(device, dtype).eval().requires_grad_(False)
    embeddings = torch.randn(1, 600, 2048, device=device, dtype=dtype) * 0.02
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step():
        x = embeddings.clone().requires_grad_(True)
        if autocast is not None:
            with autocast:
                state = model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
        else:
            state = model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
        state.float().square().sum().backward()

    cold = device.type == "cpu"
    result = _timed(step, device, 1 if cold else repeats, warmup=0 if cold else 1)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["tokens"] = 600
    return result


def case_loss(kind: str, device, repeats: int) -> dict:
    import torch

    from semrecon_core.priors.contrastive import PCA, ContrastiveLoss

    g = torch.Generator().manual_seed(0)
    weights = (0.005, 0.5, 1.0)
    if kind == "pooled":
        bank_p = [torch.randn(40, 1024, generator=g) for _ in range(3)]
        bank_n = [torch.randn(40, 1024, generator=g) for _ in range(3)]
        loss = ContrastiveLoss(bank_p, bank_n, weights=weights, similarity="pooled")
        features = [torch.randn(1, 576, 1024, generator=g) for _ in range(3)]
    elif kind == "token-pca":
        dims = (64, 128, 256)
        pca = [PCA.fit(torch.randn(4096, 1024, generator=g), d) for d in dims]
        bank_p = [torch.randn(40, 576, d, generator=g) for d in dims]
        bank_n = [torch.randn(40, 576, d, generator=g) for d in dims]
        loss = ContrastiveLoss(bank_p, bank_n, weights=weights, similarity="token-pca", pca=pca)
        features = [torch.randn(1, 576, 1024, generator=g) for _ in range(3)]
    else:
        bank_p = [torch.randn(3700, 2048, generator=g)]
        bank_n = [torch.randn(3700, 2048, generator=g)]
        loss = ContrastiveLoss(
            bank_p, bank_n, weights=[1.0], similarity="vector", tau=0.1, tau_negative=0.7, reduction="sum"
        )
        features = [torch.randn(1, 2048, generator=g)]
    loss.to(device)
    features = [f.to(device).requires_grad_(True) for f in features]

    def step():
        for f in features:
            f.grad = None
        loss(features).backward()

    return _timed(step, device, repeats * 4, warmup=2)


CASES = {
    "tiny-image": lambda d, r: case_tiny("image", d, r),
    "tiny-language": lambda d, r: case_tiny("language", d, r),
    "real-vision": case_real_vision,
    "real-llm": case_real_llm,
    "loss-pooled": lambda d, r: case_loss("pooled", d, r),
    "loss-token-pca": lambda d, r: case_loss("token-pca", d, r),
    "loss-language": lambda d, r: case_loss("language", d, r),
}


def run_case(name: str, device_name: str, repeats: int, threads: int) -> dict:
    """Run one case in this process and return its measurements (incl. peak memory)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = CASES[name](device, repeats)
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_before_case_mib"] = baseline_kib / 1024
    return result


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
    Path(temporary).replace(path)


def _markdown(runs: dict) -> str:
    lines = ["# Semantic encoder and contrastive loss: cost per call", ""]
    for device, run in runs.items():
        lines += [
            f"## {device}: {run['device_name']} ({run['dtype']}, torch {run['torch']}, {run['date']})",
            "",
        ]
        lines += [
            (
                f"CPU threads per case: {run['cpu_threads']}; 1-min load average of the (shared) machine "
                f"when the run started: {run['load_average_1min_at_start']:.1f}"
            ),
            "",
            f"Made by `{run['command']}`." if "command" in run else "The command of this run was not recorded.",
            "",
        ]
        lines += [
            "| case | seconds / call (fwd+bwd) | calls | peak RSS MiB | peak GPU MiB |",
            "|---|---|---|---|---|",
        ]
        for name, r in run["cases"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} | | | |")
                continue
            gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "–"
            lines.append(f"| {name} | {r['seconds']:.4g} | {r['calls']} | {r['peak_rss_mib']:.0f} | {gpu} |")
        lines += ["", "Ratios (same run):", ""]
        for key, value in run["ratios"].items():
            lines.append(f"- {key}: {value:.3g}")
        lines.append("")
    lines += [
        "Encoder cases: forward + backward to the complex 320×320 input image, one slice. real-* use random",
        "weights (same architecture and cost as Janus-Pro-1B); on CPU they are ONE cold call each.",
        "real-llm is the LLM alone on 600 prompt tokens (the vision tower's cost is real-vision).",
        "Loss cases: forward + backward of the contrastive loss from encoder features with real-size banks.",
        "Peak RSS is the case process's maximum resident memory (includes Python, torch and the model).",
        "Timings on a shared machine depend on its load (the 1-min load average is recorded per run).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run every case in a subprocess, compute ratios, write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-llm", action="store_true", help="skip the real-size LLM call")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per case (0: torch's default); 1 is steadier on a busy machine",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.device, args.repeats, args.threads)))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 2
    names = [n for n in CASES if not (args.skip_llm and n == "real-llm")]
    load = os.getloadavg()[0]
    cases: dict[str, dict] = {}
    for name in names:
        print(f"running {name} on {args.device} ...", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            __file__,
            "--case",
            name,
            "--device",
            args.device,
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            cases[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            cases[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {cases[name]}", file=sys.stderr, flush=True)
    ratios = {}
    for loss in ("loss-pooled", "loss-token-pca", "loss-language"):
        encoder = "real-llm" if loss == "loss-language" else "real-vision"
        if "seconds" in cases.get(loss, {}) and "seconds" in cases.get(encoder, {}):
            ratios[f"{loss} / {encoder} time"] = cases[loss]["seconds"] / cases[encoder]["seconds"]
    if "seconds" in cases.get("real-vision", {}) and "seconds" in cases.get("tiny-image", {}):
        ratios["real-vision / tiny-image time"] = cases["real-vision"]["seconds"] / cases["tiny-image"]["seconds"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    run = {
        "device_name": device_name,
        "dtype": "bfloat16 autocast (bf16 weights)" if args.device.startswith("cuda") else "float32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min_at_start": load,
        "cpu_threads": args.threads or torch.get_num_threads(),
        "cases": cases,
        "ratios": ratios,
        "command": shlex.join(["python", "benchmarks/bench_encoder.py", *sys.argv[1:]]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "encoder.json"
    runs = json.loads(json_path.read_text())["runs"] if json_path.is_file() else {}
    runs["cuda" if args.device.startswith("cuda") else "cpu"] = run
    _write_atomic(json_path, json.dumps({"runs": runs}, indent=2) + "\n")
    _write_atomic(RESULTS / "encoder.md", _markdown(runs))
    print(_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
