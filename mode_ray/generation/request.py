"""Where a request becomes a trajectory: `prepare` turns validated parameters into a `RequestState`, which
both loops drive the same way, the in-process `generate_local` and the router's step engine:

    state = prepare(params, config, cards)
    while not state.done:
        x, sigma = state.query()                       # (B, C, H, W), (B,)
        plan = state.plan(gate(x, sigma, state.cond, cards), x, sigma)
        outputs = {e: expert_e(plan rows of e) ...}     # in-process modules or gRPC calls
        state.advance(plan, outputs, failed)           # renormalise, trace, sampler step
    result = state.result()

so the in-process and the served paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mode_ray.diffusion import Trajectory, karras_sigmas, make_trajectory
from mode_ray.generation.bundle import MixtureConfig
from mode_ray.generation.params import GenerateParams, ResolvedRequest, resolve
from mode_ray.generation.result import GenerationResult, StepTrace
from mode_ray.models.card import ExpertCard
from mode_ray.routing.step import StepPlan, allowed_mask, finish_step, plan_step
from mode_ray.routing.topk import Routing, drop_experts


def initial_noise(seed: int, num: int, shape: tuple[int, int, int], sigma_max: float) -> torch.Tensor:
    """x_T = sigma_max * n with n ~ N(0, I) from a CPU generator seeded by `seed`: (num, C, H, W) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=g) * sigma_max


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> images in [0, 1]: (N, C, H, W) float32 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def trace_step(
    step: int, sigma: float, routing: Routing, names: Sequence[str], dropped: torch.Tensor | None = None
) -> StepTrace:
    """The routing of one evaluation (B rows) by expert name; dropped: (B,) mass lost to failed experts."""
    experts, weights = [], []
    for idx_row, w_row in zip(routing.indices.tolist(), routing.weights.tolist(), strict=True):
        kept = [(names[i], round(w, 6)) for i, w in zip(idx_row, w_row, strict=True) if i >= 0 and w > 0]
        experts.append([n for n, _ in kept])
        weights.append([w for _, w in kept])
    b = routing.indices.shape[0]
    drop = [0.0] * b if dropped is None else [round(float(d), 6) for d in dropped[:b]]
    return StepTrace(step, round(sigma, 6), experts, weights, drop)


@dataclass
class RequestState:
    """One request on its way from noise to images.

    names: the experts it may route to (the order of the gate's logits); cond: (B, D) or None on the
    trajectory's device; allowed: (N,) bool or None (pinned / excluded experts); trace: one StepTrace per
    evaluation; dropped: routing weight lost to failed experts, summed over rows and evaluations.
    """

    req: ResolvedRequest
    names: tuple[str, ...]
    traj: Trajectory
    cond: torch.Tensor | None
    allowed: torch.Tensor | None
    trace: list[StepTrace] = field(default_factory=list)
    dropped: float = 0.0

    @property
    def done(self) -> bool:
        return self.traj.done

    @property
    def evals(self) -> int:
        return len(self.trace)

    @property
    def rows(self) -> int:
        return self.req.num_images

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next evaluation point: x (B, C, H, W) and sigma (B,)."""
        return self.traj.query()

    def plan(self, logits: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> StepPlan:
        """Route the query's rows from the gate's logits (B, N) with this request's settings."""
        return plan_step(
            logits,
            x,
            sigma,
            self.cond,
            top_k=self.req.top_k,
            top_p=self.req.top_p,
            min_weight=self.req.min_weight,
            guidance_scale=self.req.guidance_scale,
            allowed=self.allowed,
        )

    def advance(
        self,
        plan: StepPlan,
        outputs: Mapping[int, torch.Tensor],
        failed: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        """Combine the chosen experts' outputs[e]: (R_e, C, H, W) and take the sampler step.

        Experts in `failed` are dropped and the remaining weights renormalised (their mass is traced);
        NoExpertLeft when a row loses every chosen expert.
        """
        routing, dropped = plan.routing, None
        if failed:
            routing, dropped = drop_experts(plan.routing, set(failed))
            self.dropped += float(dropped[: self.rows].sum())
        sigma = float(plan.sigma[0])
        self.trace.append(trace_step(self.evals, sigma, routing.first(self.rows), self.names, dropped))
        with torch.no_grad():
            self.traj.advance(finish_step(plan, outputs, routing))

    def result(
        self,
        request_id: str = "",
        registry_version: int | None = None,
        seconds: float = 0.0,
        timing: list[dict] | None = None,
    ) -> GenerationResult:
        labels = [-1 if self.req.label is None else self.req.label] * self.rows
        return GenerationResult(
            images=to_images(self.traj.x),
            labels=labels,
            seed=self.req.seed,
            trace=self.trace,
            dropped_mass=round(self.dropped, 6),
            request_id=request_id,
            registry_version=registry_version,
            seconds=round(seconds, 4),
            timing=timing,
        )


def prepare(
    params: GenerateParams | ResolvedRequest,
    config: MixtureConfig,
    experts: Sequence[ExpertCard],
    device: torch.device | str = "cpu",
) -> RequestState:
    """Resolve `params` against the mixture's defaults, check pinned / excluded names against `experts` and
    start the trajectory at x_T = sigma_max * n (seeded, drawn on the CPU so every device gets the same n).
    A ValueError naming the field for anything the request cannot have."""
    if not experts:
        raise ValueError("experts: no expert is registered and ready")
    req = params if isinstance(params, ResolvedRequest) else resolve(params, config)
    names = tuple(c.name for c in experts)
    allowed = allowed_mask(names, req.pin, req.exclude)
    shape = tuple(experts[0].latent_shape)
    x = initial_noise(req.seed, req.num_images, shape, config.sigma_max).to(device)  # type: ignore[arg-type]
    sigmas = karras_sigmas(req.steps, config.sigma_min, config.sigma_max)
    return RequestState(
        req=req,
        names=names,
        traj=make_trajectory(req.sampler, x, sigmas),
        cond=None if req.cond is None else req.cond.to(device),
        allowed=None if allowed is None else allowed.to(device),
    )
