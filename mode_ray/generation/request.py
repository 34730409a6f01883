"""Where a request becomes a trajectory: `prepare` turns validated parameters into a `RequestState` (the
resumable sampler trajectory, the allowed-expert mask, the trace, the dropped mass). Both loops, the in-process
`generate_local` and the router's step engine, step it the same way, through `mode_ray.generation.batch`:

    state = prepare(params, config, cards)
    while not state.done:
        queries = stack_queries([state, ...])                    # x (R, C, H, W), sigma (R,), cond (R, D)
        plan = plan_batch(states, queries, gate(queries.x, queries.sigma, queries.cond, cards))
        outputs = {e: expert_e(plan rows of e) ...}             # in-process modules or remote calls
        advance_batch(states, plan, outputs, failed)            # renormalise, combine, guide, trace, step
    result = state.result()

so the in-process and the served paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from mode_ray.diffusion import Trajectory, karras_sigmas, make_trajectory
from mode_ray.generation.bundle import MixtureConfig
from mode_ray.generation.params import GenerateParams, ResolvedRequest, resolve
from mode_ray.generation.result import GenerationResult, StepTrace
from mode_ray.models.card import ExpertCard
from mode_ray.routing.step import allowed_mask, needs_guidance


def initial_noise(seed: int, num: int, shape: tuple[int, int, int], sigma_max: float) -> torch.Tensor:
    """x_T = sigma_max * n with n ~ N(0, I) from a CPU generator seeded by `seed`: (num, C, H, W) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=g) * sigma_max


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> images in [0, 1]: (N, C, H, W) float32 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def trace_step(
    step: int,
    sigma: float,
    indices: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    names: Sequence[str],
    dropped: Sequence[float] | None = None,
) -> StepTrace:
    """The routing of one evaluation (B rows) by expert name. indices / weights: (B, k) as lists (PAD < 0);
    dropped: (B,) mass lost to failed experts."""
    experts: list[list[str]] = []
    kept_weights: list[list[float]] = []
    for idx_row, w_row in zip(indices, weights, strict=True):
        row_names, row_weights = [], []
        for i, w in zip(idx_row, w_row, strict=True):
            if i >= 0 and w > 0:
                row_names.append(names[i])
                row_weights.append(round(w, 6))
        experts.append(row_names)
        kept_weights.append(row_weights)
    drop = [0.0] * len(experts) if dropped is None else [round(float(d), 6) for d in dropped]
    return StepTrace(step, round(sigma, 6), experts, kept_weights, drop)


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

    @property
    def total_evals(self) -> int:
        return self.traj.total_evals

    @property
    def branches(self) -> int:
        """Model rows per image per evaluation: 2 under classifier-free guidance (a null-condition copy)."""
        return 2 if needs_guidance(self.cond, self.req.guidance_scale) else 1

    @cached_property
    def cost(self) -> int:
        """Model rows one evaluation of this request sends to the experts (before top-k): images x branches
        (fixed for the request's life; the scheduler reads it many times a tick)."""
        return self.rows * self.branches

    @property
    def rows_left(self) -> int:
        """Model rows still to evaluate (before top-k): the scheduler's measure of the work left."""
        return self.cost * (self.total_evals - self.evals)

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next evaluation point: x (B, C, H, W) and sigma (B,)."""
        return self.traj.query()

    def split(self, max_images: int) -> list[RequestState]:
        """This not yet started request as independent slices of at most `max_images` images (its images
        are independent trajectories: slice j holds images [j * max_images, ...) of the same x_T and
        condition), so a scheduler can advance a large request a few images at a time. `merge_results` of
        the slices' results equals this request's result."""
        if self.evals:
            raise ValueError("only a request that has not started can be split")
        b = self.rows
        if b <= max_images:
            return [self]
        parts = []
        for a in range(0, b, max_images):
            z = min(b, a + max_images)
            cond = None if self.cond is None else self.cond[a:z]
            req = replace(
                self.req,
                num_images=z - a,
                labels=None if self.req.labels is None else self.req.labels[a:z],
                cond=None if self.req.cond is None else self.req.cond[a:z],
            )
            traj = make_trajectory(self.req.sampler, self.traj.x[a:z], self.traj.sigmas)
            parts.append(RequestState(req=req, names=self.names, traj=traj, cond=cond, allowed=self.allowed))
        return parts

    def result(
        self,
        request_id: str = "",
        registry_version: int | None = None,
        seconds: float = 0.0,
        timing: list[dict] | None = None,
        latent: bool = False,
    ) -> GenerationResult:
        """latent: the mixture has a decoder; the result keeps x as `latents` (decode with `decoded`)."""
        return GenerationResult(
            images=to_images(self.traj.x),
            labels=[-1] * self.rows if self.req.labels is None else list(self.req.labels),
            seed=self.req.seed,
            trace=self.trace,
            dropped_mass=round(self.dropped, 6),
            request_id=request_id,
            registry_version=registry_version,
            seconds=round(seconds, 4),
            timing=timing,
            latents=self.traj.x.float().cpu() if latent else None,
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
