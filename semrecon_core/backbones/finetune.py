"""Scan-specific self-supervised fitting of the deep backbones (paper Eq. 7).

``min_θ  D(A f_θ(x₀), y) + λ · R(f_θ(x₀))`` where ``A = M F C`` is the SENSE operator of the scan, ``y``
the measured k-space, ``x₀`` the zero-filled image (max magnitude 1), ``D`` the data term
(``config.data_term``: paper ``0.5·Σ|·|²``, public code mean absolute difference of the stacked real and
imaginary parts) and ``R`` the prior (TV, the semantic contrastive loss, or none). Adam with
``StepLR(1000, 0.5)``. Three engines share this loop (registered in ``semrecon_core.recon.ENGINES``):

- :func:`reconstruct_unet`: the U-Net maps ``x₀`` to the image;
- :func:`reconstruct_unrolled`: U-Nets alternating with CG data consistency, trained SSDU-style (the
  network sees 60 % of the samples, the data term uses the other 40 %), then run on all samples;
- :func:`reconstruct_inr`: a SIREN represents the image (``paper`` preset: Eq. 7 directly;
  ``public-code`` preset: phase 1 data + 3·TV, phase 2 frozen SIREN + CNN adaptor with data + λ·prior).

With ``config.checkpoint`` the U-Net / unrolled network starts from a warm-start checkpoint and only
LoRA adapters (rank ``config.lora_rank``; 0 = all weights) train; without one, every weight of a
randomly initialised network trains. Slices are fitted in batches of ``config.slice_batch`` (0 = all),
each batch from the same initial weights. The callback receives one dict per iteration (flushed every
few iterations so the loop does not synchronise with the host every step), including the semantic
prior's ``embed`` and ``answer`` at those points when the prior has them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from semrecon_core.backbones.lora import apply_lora, count_parameters
from semrecon_core.backbones.siren import Adaptor, InrImage, SirenSpec
from semrecon_core.backbones.unet import UNet
from semrecon_core.backbones.unrolled import UnrolledNet, ssdu_split
from semrecon_core.config import ReconConfig
from semrecon_core.physics.cg import conjugate_gradient
from semrecon_core.physics.sense import SenseOp
from semrecon_core.recon import Callback, ReconProblem, ReconResult

log = logging.getLogger(__name__)

STEP_SIZE = 1000  # StepLR period (public code)
STEP_GAMMA = 0.5
SSDU_HOLDOUT = 0.4  # fraction of measured samples held out for the unrolled network's loss
INR_TV_WEIGHT = 3.0  # phase 1 of the public code's INR: L1 + 3·TV
ADAPTOR_LR = 1e-3  # public code's generic Adam step, used for the INR adaptor


# ----------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------


def data_term(predicted: torch.Tensor, measured: torch.Tensor, kind: str) -> torch.Tensor:
    """Data fidelity between predicted and measured (already masked) k-space.

    ``l2``: ``0.5·Σ|p − y|²`` (paper); ``l1``: mean of ``|Re(p − y)|`` and ``|Im(p − y)|`` over the
    whole masked array (public code's ``L1Loss`` on stacked real/imaginary parts).
    """
    residual = predicted - measured
    if kind == "l2":
        return 0.5 * residual.abs().square().sum()
    if kind == "l1":
        return torch.view_as_real(residual).abs().mean()
    raise ValueError(f"data term: expected 'l2' or 'l1', found {kind!r}")


def final_data_consistency(
    image: torch.Tensor, kspace: torch.Tensor, op: SenseOp, *, weight: float = 1e-3, iterations: int = 30
) -> torch.Tensor:
    """Data-consistency step: ``argmin_x ‖A x − y‖² + weight·‖x − image‖²`` by conjugate gradient from ``image``.

    With a small ``weight`` the result reproduces the measured samples (up to noise the network removed
    and the conditioning of ``A``) while keeping the network's image in the unmeasured part.
    """
    measured = kspace * op.mask.unsqueeze(-3)
    with torch.no_grad():
        return conjugate_gradient(
            op.normal, op.adjoint(measured) + weight * image, lam=weight, x0=image, max_iter=iterations
        )


def resolve_prior(config: ReconConfig, device: torch.device, prior: Any = None) -> Any:
    """The prior to use: ``prior`` when given, else ``semrecon_core.priors.build_prior(config, device)``."""
    if prior is not None:
        return prior
    if config.prior == "none":
        return None
    from semrecon_core.priors import build_prior

    return build_prior(config, device)


def _prior_label(prior: Any) -> str:
    return "no prior" if prior is None else str(prior.label)


def _autocast(device: torch.device, config: ReconConfig, allowed: bool = True) -> Any:
    """bf16 autocast on CUDA when configured (never on CPU, where it is slow and changes results)."""
    if allowed and device.type == "cuda" and config.autocast == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _trace_every(iterations: int) -> int:
    """How often losses are flushed to the callback/progress bar and the prior's embedding is recorded."""
    return max(1, min(50, math.ceil(iterations / 30)))


def _chunks(slices: int, batch: int) -> list[slice]:
    step = slices if batch <= 0 else batch
    return [slice(start, min(start + step, slices)) for start in range(0, slices, step)]


def _sub_problem(problem: ReconProblem, part: slice) -> ReconProblem:
    return ReconProblem(
        kspace=problem.kspace[part],
        mask=problem.mask[part],
        maps=problem.maps[part],
        scale=problem.scale,
        device=problem.device,
    )


def _relative_residual(image: torch.Tensor, problem: ReconProblem) -> float:
    op = SenseOp(problem.maps, problem.mask)
    measured = problem.kspace * problem.mask.unsqueeze(-3)
    return float((op(image) - measured).norm() / measured.norm().clamp_min(1e-12))


_Closure = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _Optimiser:
    """Adam + StepLR loop over a closure returning ``(image, {term: tensor})`` with ``"loss"`` the total.

    Keeps loss terms on the device and flushes them to the progress bar, the log and the callback every
    ``_trace_every`` iterations; at those iterations it also records the prior's embedding and answer.
    """

    def __init__(
        self,
        parameters: list[nn.Parameter],
        *,
        lr: float,
        iterations: int,
        device: torch.device,
        prior: Any,
        callback: Callback | None,
        description: str,
        extra: dict[str, Any],
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError(f"{description}: no trainable parameters")
        self.optimizer = torch.optim.Adam(self.parameters, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=STEP_SIZE, gamma=STEP_GAMMA)
        self.iterations = iterations
        self.device = device
        self.prior = prior
        self.callback = callback
        self.description = description
        self.extra = extra
        self.trace: list[dict[str, Any]] = []

    def run(self, closure: _Closure) -> torch.Tensor:
        """Optimise for ``iterations`` steps; returns the detached image of the last step."""
        from tqdm.auto import tqdm

        every = _trace_every(self.iterations)
        pending: list[dict[str, torch.Tensor]] = []
        image = None
        started = time.perf_counter()
        with tqdm(total=self.iterations, desc=self.description, unit="it", disable=None, leave=False) as bar:
            for iteration in range(self.iterations):
                self.optimizer.zero_grad(set_to_none=True)
                image, terms = closure()
                terms["loss"].backward()
                self.optimizer.step()
                self.scheduler.step()
                pending.append({name: value.detach() for name, value in terms.items()})
                last = iteration == self.iterations - 1
                if len(pending) == every or last:
                    self._flush(pending, iteration, image.detach(), bar, started)
                    pending = []
        if image is None:
            raise ValueError(f"{self.description}: expected at least one iteration, found 0")
        return image.detach()

    def _flush(
        self,
        pending: list[dict[str, torch.Tensor]],
        iteration: int,
        image: torch.Tensor,
        bar: Any,
        started: float,
    ) -> None:
        names = list(pending[0])
        values = torch.stack([torch.stack([record[n].float() for n in names]) for record in pending]).tolist()
        first = iteration - len(pending) + 1
        records = [
            {"iteration": first + k, **self.extra, **dict(zip(names, row, strict=True))} for k, row in enumerate(values)
        ]
        records[-1]["lr"] = self.scheduler.get_last_lr()[0]
        records[-1].update(self._semantic_status(image))
        self.trace.extend(records)
        if self.callback is not None:
            for record in records:
                self.callback(record)
        bar.update(len(pending))
        bar.set_postfix({n: f"{v:.4g}" for n, v in zip(names, values[-1], strict=True)}, refresh=False)
        elapsed = time.perf_counter() - started
        eta = elapsed / (iteration + 1) * (self.iterations - iteration - 1)
        log.info(
            "%s: iteration %d/%d %s (eta %.0f s)",
            self.description,
            iteration + 1,
            self.iterations,
            " ".join(f"{n}={v:.4g}" for n, v in zip(names, values[-1], strict=True)),
            eta,
        )

    @torch.no_grad()
    def _semantic_status(self, image: torch.Tensor) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.prior is None:
            return status
        embed = getattr(self.prior, "embed", None)
        if embed is not None:
            # the embedding of the last loss evaluation spares a second encoder pass when the prior keeps it
            cached = getattr(self.prior, "last_embedding", None)
            embedding = cached if cached is not None and cached.shape[0] == image.shape[0] else embed(image)
            status["embedding"] = embedding.float().cpu().tolist()
        answer = getattr(self.prior, "answer", None)
        if answer is not None:
            reply = answer(image)
            if reply is not None:
                status["answer"] = reply
        return status


def _prepare_network(
    network: nn.Module | None,
    config: ReconConfig,
    backbone: str,
    default: Callable[[], nn.Module],
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The network to fit, its label and info: a given one, a warm start (LoRA) or a fresh random one."""
    from semrecon_core.backbones.checkpoint import load_backbone

    info: dict[str, Any] = {"warm_start": config.checkpoint, "lora_rank": 0}
    name = {"unet": "U-Net", "unrolled": "unrolled network"}[backbone]
    if config.checkpoint:
        if network is not None:
            raise ValueError("pass either a network or config.checkpoint, not both")
        network, meta = load_backbone(config.checkpoint, backbone)
        info["checkpoint_metadata"] = {k: meta[k] for k in ("architecture", "epochs") if k in meta}
        if config.lora_rank > 0:
            apply_lora(network, config.lora_rank)
            if isinstance(network, UnrolledNet):
                network.lam.requires_grad_(True)
            info["lora_rank"] = config.lora_rank
            label = f"{name} (warm start, LoRA rank {config.lora_rank})"
        else:
            label = f"{name} (warm start, all weights trained)"
    else:
        network = network if network is not None else default()
        label = f"{name} (random init, all weights trained)"
    info.update(count_parameters(network))
    info["trainable_parameters"] = info.pop("trainable")
    info["total_parameters"] = info.pop("total")
    return network, label, info


def _finish(
    images: list[torch.Tensor],
    problem: ReconProblem,
    config: ReconConfig,
    label: str,
    prior: Any,
    info: dict[str, Any],
    trace: list[dict[str, Any]],
) -> ReconResult:
    image = torch.cat(images, dim=0)
    if config.final_dc:
        image = final_data_consistency(image, problem.kspace, SenseOp(problem.maps, problem.mask))
    # pixels where no coil is sensitive (ESPIRiT crops its maps) are not determined by the data: zero them
    support = problem.maps.abs().square().sum(dim=1) > 0
    outside = int((~support).sum())
    image = image * support
    info = {**info, "iterations": config.iterations, "final_dc": config.final_dc, "pixels_outside_maps": outside}
    info["data_residual"] = _relative_residual(image, problem)
    return ReconResult(image=image, label=f"{label} + {_prior_label(prior)}", info=info, trace=trace)


# ----------------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------------


def _fit_network(
    problem: ReconProblem,
    config: ReconConfig,
    base: nn.Module,
    *,
    prior: Any,
    callback: Callback | None,
    name: str,
    batch: Callable[[nn.Module, ReconProblem], tuple[_Closure, Callable[[], torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Fit a copy of ``base`` to each slice batch; returns the batches' images and the joint trace.

    ``batch(net, sub)`` gives the training closure of ``net`` on the sub-problem and the function that
    computes the batch's final image once training is done (run without gradients, under autocast).
    """
    images: list[torch.Tensor] = []
    trace: list[dict[str, Any]] = []
    for part in _chunks(problem.kspace.shape[0], config.slice_batch):
        net = copy.deepcopy(base).train()
        closure, final = batch(net, _sub_problem(problem, part))
        loop = _Optimiser(
            list(net.parameters()),
            lr=config.lr,
            iterations=config.iterations,
            device=problem.device,
            prior=prior,
            callback=callback,
            description=f"{name} slices {part.start}-{part.stop - 1}",
            extra={"slices": [part.start, part.stop]},
        )
        loop.run(closure)
        with torch.no_grad(), _autocast(problem.device, config):
            images.append(final().detach())
        trace.extend(loop.trace)
    return images, trace


def reconstruct_unet(
    problem: ReconProblem,
    config: ReconConfig,
    *,
    callback: Callback | None = None,
    prior: Any = None,
    network: UNet | None = None,
) -> ReconResult:
    """Fit a U-Net to the scan with Eq. (7); ``network`` overrides the paper's default architecture."""
    config = config.resolved()
    torch.manual_seed(config.seed)
    prior = resolve_prior(config, problem.device, prior)
    base, label, info = _prepare_network(network, config, "unet", UNet)

    def batch(net: nn.Module, sub: ReconProblem) -> tuple[_Closure, Callable[[], torch.Tensor]]:
        op = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        zero_filled = op.adjoint(measured)

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with _autocast(problem.device, config):
                image = net(zero_filled)
            return image, _loss_terms(image, op, measured, config, prior)

        return closure, lambda: net(zero_filled)

    images, trace = _fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="U-Net", batch=batch
    )
    return _finish(images, problem, config, label, prior, info, trace)


def reconstruct_unrolled(
    problem: ReconProblem,
    config: ReconConfig,
    *,
    callback: Callback | None = None,
    prior: Any = None,
    network: UnrolledNet | None = None,
) -> ReconResult:
    """Fit the unrolled network SSDU-style (40 % of the samples held out for the data term)."""
    config = config.resolved()
    torch.manual_seed(config.seed)
    prior = resolve_prior(config, problem.device, prior)
    base, label, info = _prepare_network(network, config, "unrolled", UnrolledNet)
    generator = torch.Generator().manual_seed(config.seed)
    learned: list[float] = []

    def batch(net: nn.Module, sub: ReconProblem) -> tuple[_Closure, Callable[[], torch.Tensor]]:
        theta, held = ssdu_split(sub.mask, holdout=SSDU_HOLDOUT, generator=generator)
        op_net, op_loss = SenseOp(sub.maps, theta), SenseOp(sub.maps, held)
        seen = sub.kspace * theta.unsqueeze(-3)
        held_out = sub.kspace * held.unsqueeze(-3)
        start = op_net.adjoint(seen)
        op_full = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        zero_filled = op_full.adjoint(measured)

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with _autocast(problem.device, config):
                image = net(start, seen, op_net)
            return image, _loss_terms(image, op_loss, held_out, config, prior)

        def final() -> torch.Tensor:
            """The trained network on all measured samples; records its learned data-consistency weight."""
            learned.append(float(net.lam.detach().abs()))
            return net(zero_filled, measured, op_full)

        return closure, final

    images, trace = _fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="unrolled", batch=batch
    )
    info["learned_dc_weight"] = learned
    info["ssdu_holdout"] = SSDU_HOLDOUT
    return _finish(images, problem, config, label, prior, info, trace)


def reconstruct_inr(
    problem: ReconProblem,
    config: ReconConfig,
    *,
    callback: Callback | None = None,
    prior: Any = None,
    spec: SirenSpec | None = None,
) -> ReconResult:
    """Fit a SIREN to the scan: Eq. (7) directly (``paper``) or the public code's two phases.

    ``spec`` overrides the default SIREN (8 × 256, ω0 = 15). The public-code form runs ``iterations``
    steps of phase 1 (data + 3·TV on the SIREN) and ``iterations`` steps of phase 2 (SIREN frozen, a 3-layer
    CNN adaptor trained with data + λ·prior at learning rate 1e-3).
    """
    from semrecon_core.priors.tv import TVPrior

    config = config.resolved()
    torch.manual_seed(config.seed)
    prior = resolve_prior(config, problem.device, prior)
    spec = spec or SirenSpec()
    two_phase = config.preset == "public-code"
    images: list[torch.Tensor] = []
    trace: list[dict[str, Any]] = []
    info: dict[str, Any] = {"siren": spec.to_dict(), "form": "two-phase" if two_phase else "eq7"}
    for part in _chunks(problem.kspace.shape[0], config.slice_batch):
        sub = _sub_problem(problem, part)
        torch.manual_seed(config.seed)
        inr = InrImage(tuple(sub.kspace.shape[:1]) + tuple(sub.kspace.shape[-2:]), spec).to(problem.device)
        op = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        extra = {"slices": [part.start, part.stop]}
        first_prior = TVPrior(INR_TV_WEIGHT) if two_phase else prior
        first_lam = 1.0 if two_phase else config.lam

        def phase1(
            inr: InrImage = inr,
            op: SenseOp = op,
            measured: torch.Tensor = measured,
            first_prior: Any = first_prior,
            first_lam: float = first_lam,
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            image = inr()
            return image, _loss_terms(image, op, measured, config, first_prior, lam=first_lam)

        loop = _Optimiser(
            list(inr.parameters()),
            lr=config.lr,
            iterations=config.iterations,
            device=problem.device,
            prior=first_prior,
            callback=callback,
            description=f"INR slices {part.start}-{part.stop - 1}",
            extra={**extra, "phase": 1},
        )
        loop.run(phase1)
        trace.extend(loop.trace)
        with torch.no_grad():
            image = inr().detach()
        if two_phase:
            info.setdefault("phase1_label", first_prior.label)
            base_image = image
            torch.manual_seed(config.seed)
            adaptor = Adaptor().to(problem.device)

            def phase2(
                adaptor: Adaptor = adaptor,
                op: SenseOp = op,
                measured: torch.Tensor = measured,
                base_image: torch.Tensor = base_image,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                with _autocast(problem.device, config):
                    refined = adaptor(base_image)
                return refined, _loss_terms(refined, op, measured, config, prior)

            loop = _Optimiser(
                list(adaptor.parameters()),
                lr=ADAPTOR_LR,
                iterations=config.iterations,
                device=problem.device,
                prior=prior,
                callback=callback,
                description=f"INR adaptor slices {part.start}-{part.stop - 1}",
                extra={**extra, "phase": 2},
            )
            loop.run(phase2)
            trace.extend(loop.trace)
            with torch.no_grad(), _autocast(problem.device, config):
                image = adaptor(base_image).detach().to(torch.complex64)
        images.append(image)
    info["trainable_parameters"] = count_parameters(InrImage((1, 2, 2), spec))["trainable"]
    name = "SIREN INR (two-phase, adaptor)" if two_phase else "SIREN INR"
    return _finish(images, problem, config, name, prior, info, trace)


def _loss_terms(
    image: torch.Tensor,
    op: SenseOp,
    measured: torch.Tensor,
    config: ReconConfig,
    prior: Any,
    *,
    lam: float | None = None,
) -> dict[str, torch.Tensor]:
    """``{"data", "prior", "loss"}`` for an image against the measured samples of ``op``'s mask."""
    image = image.to(torch.complex64)
    data = data_term(op(image), measured, config.data_term)
    terms = {"data": data}
    if prior is not None:
        terms["prior"] = prior.loss(image)
        terms["loss"] = data + (config.lam if lam is None else lam) * terms["prior"]
    else:
        terms["loss"] = data
    return terms
