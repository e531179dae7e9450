"""The sparsity callback: masks in force across optimizer steps, schedules, metrics, state.

Per step (see kiln.train.callbacks for the hook order):

* ``after_backward(s)``: at a RigL update step the forward/backward ran dense (SparseLinear
  ``dense_now``), so the full weight gradient is scored per unit for regrowth first; then every
  sparse layer's gradient that is not already zero outside its mask (dense-computed: RigL's
  step, or a kernel without masked gradients) is multiplied by its mask, so clipping and AdamW
  see masked grads.
* ``after_optimizer_step(s)``, with t = s + 1 completed steps: build the masks at
  ``mask_step``; GMP prune; SET/RigL drop-and-grow; SPDF turn dense; then, if any mask changed,
  re-apply every mask to the weight *and* AdamW's ``exp_avg`` / ``exp_avg_sq``, so pruned
  weights and their moments become exactly zero and regrown weights start at zero with zero
  moments. Between mask changes nothing needs re-applying: a weight that is zero with zero
  moments and a zero gradient stays exactly zero through AdamW (m = v = 0, update 0/(0+ε) = 0,
  decay 0·(1−ηλ) = 0), so the step costs no pass over the dense-shaped tensors.

State (checkpointed): each mask as a bool ``[out, in]`` tensor, the RNG of random masks and SET
regrowth, and the kernel each layer uses (re-used on resume, so a resumed run computes exactly
what the uninterrupted one did even with ``kernel: auto``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.config import SparsityConfig
from kiln.errors import ConfigError
from kiln.sparsity import algorithms as alg
from kiln.sparsity.apply import (
    FUSED_KERNELS,
    SparseGeluMLP,
    SparseLinear,
    fuse_mlps,
    pick_kernel,
    swap_in,
)
from kiln.sparsity.masks import (
    UnitSpec,
    distribute,
    initial_mask,
    linear_weights,
    quantize,
    select_params,
    unit_spec,
)
from kiln.train.callbacks import Callback


@dataclass
class Layer:
    """One sparse matrix: its Parameter, swapped-in module, unit layout and masks."""

    name: str
    param: nn.Parameter
    module: SparseLinear
    spec: UnitSpec
    density: float
    """Final target density (1 − level)."""
    kept: torch.Tensor
    """bool [groups, units] (CPU): the mask in unit form."""


@dataclass
class Runtime:
    """What the callback needs from the job besides its own section."""

    seed: int = 0
    max_steps: int | None = None
    tokens: int = 2048
    """Tokens per forward (micro-batch × sequence length), for kernel timing."""
    precision: str = "bf16"
    device: torch.device = torch.device("cpu")


class SparsityCallback(Callback):
    name = "sparsity"

    def __init__(
        self,
        cfg: SparsityConfig,
        layers: list[Layer],
        optimizer: torch.optim.Optimizer,
        runtime: Runtime,
        flops_dense_params: int,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.layers, self.optimizer, self.rt, self.log = (
            cfg,
            layers,
            optimizer,
            runtime,
            log,
        )
        self.flops_dense_params = flops_dense_params
        self.gen = torch.Generator().manual_seed(runtime.seed + 7919)
        three_quarters = max(1, int(0.75 * (runtime.max_steps or 0)))
        self.end_step = cfg.end_step if cfg.end_step is not None else three_quarters
        self.stop_step = cfg.stop_step if cfg.stop_step is not None else three_quarters
        self.dense_step = cfg.dense_step if cfg.dense_step is not None else three_quarters
        self.masked = False
        """Masks have been built (False before mask_step, and GMP before start_step)."""
        self.dense = False
        """SPDF has switched to dense fine-tuning."""
        self.grow_scores: dict[str, torch.Tensor] = {}
        self.changed = True
        """A mask changed since the last metrics line (per-parameter sparsity is logged)."""
        self.stale = True
        """A mask changed since weights and moments were last zeroed outside the masks."""
        self._reasons: dict[tuple, str] = {}
        self.mlps: list[SparseGeluMLP] = []
        """GELU MLPs with both linears sparse (fused where both use one C++ block kernel and,
        with kernel 'auto', the fused kernel was timed fastest)."""
        self._fused_reported: int | None = None
        self._timed: set[str] = set()
        """Layers whose kernel ``auto`` just chose by timing (their MLP is timed next)."""

    # -- building and applying masks -------------------------------------------------------
    def build_masks(self) -> None:
        """Initial masks (random or magnitude) at the final density of each layer."""
        for layer in self.layers:
            mask = initial_mask(
                self.cfg, layer.name, layer.spec, layer.density, layer.param, self.gen
            )
            self._set(layer, layer.spec.to_units(mask))
        self._choose_mlps()
        self.masked = True

    def _set(self, layer: Layer, kept: torch.Tensor, kernel: str | None = None) -> None:
        """Adopt ``kept`` for ``layer``: expand, choose (or reuse) a kernel, mask the weight."""
        density_before = float(layer.kept.float().mean())
        layer.kept = kept
        mask = layer.spec.expand(kept)
        density = float(kept.float().mean())
        fn = None
        if kernel is None and density == density_before and layer.module.kernel != "dense":
            kernel, fn = layer.module.kernel, layer.module._fn
        if kernel is None:
            kernel, fn, reason = pick_kernel(
                self.cfg.kernel,
                self.cfg.pattern,
                layer.spec.block,
                tuple(layer.param.shape),
                density,
                self.rt.tokens,
                self.rt.precision,
                self.rt.device,
            )
            if self.cfg.kernel == "auto" and density < 1.0:
                self._timed.add(layer.name)
            key = (tuple(layer.param.shape), round(density, 6), kernel)
            if key not in self._reasons:
                self._reasons[key] = reason
                self.log(
                    f"sparsity: {list(layer.param.shape)} at density {density:.4f} → "
                    f"kernel {kernel} ({reason})"
                )
        layer.module.set_mask(mask, kernel, fn)
        self.changed = self.stale = True

    def _choose_mlps(self) -> None:
        """With kernel 'auto': time each GELU MLP whose linears were just chosen as a whole —
        dense, its linears' own kernels, the fused block kernel — and adopt the fastest
        (:func:`kiln.sparsity.mlp_choice.choose_mlp`); a fused win moves both linears onto
        that block kernel, so the fused MLP runs only on linears that use it."""
        timed, self._timed = self._timed, set()
        block = self.cfg.block_size
        if not timed or self.cfg.pattern != "block" or block % 32 or self.rt.precision != "bf16":
            return  # the fused kernel runs bf16 blocks of a multiple of 32
        from kiln.sparsity.mlp_choice import PER_LINEAR, choose_mlp, fused_backends

        if not fused_backends():
            return
        layers = {id(layer.module): layer for layer in self.layers}
        for mlp in self.mlps:
            pair = [layers[id(mlp.w1)], layers[id(mlp.w2)]]
            if not all(layer.name in timed for layer in pair):
                continue
            densities = tuple(round(float(layer.kept.float().mean()), 6) for layer in pair)
            own = (mlp.w1.kernel, mlp.w2.kernel)
            hidden, d_model = pair[0].param.shape
            args = (d_model, hidden, self.rt.tokens, pair[0].spec.block, densities, own)
            choice, reason = choose_mlp(*args, self.rt.device)
            mlp.fuse = choice.startswith("fused-")
            if choice != PER_LINEAR:
                kernel = "dense" if choice == "dense" else "block-" + choice.split("-", 1)[1]
                for layer in pair:
                    layer.module.set_mask(layer.module.mask, kernel)
            key = ("mlp", *args)
            if key not in self._reasons:
                self._reasons[key] = reason
                self.log(
                    f"sparsity: GELU MLP {list(pair[0].param.shape)} → "
                    f"{list(pair[1].param.shape)} at density {densities[0]:.4f}/"
                    f"{densities[1]:.4f} → {choice} ({reason})"
                )

    def _report_fusion(self) -> None:
        """Say how many GELU MLPs really run fused, after the kernels were chosen (and again
        whenever that number changes)."""
        fused = sum(mlp.fused for mlp in self.mlps)
        if self.mlps and fused != self._fused_reported:
            self._fused_reported = fused
            used = sorted({mlp.w1.kernel for mlp in self.mlps if mlp.fused})
            why = (
                f"their linears use {' / '.join(used)}"
                if fused
                else f"fusion needs both linears on one of {', '.join(FUSED_KERNELS)}"
                + (" and a timed win" if self.cfg.kernel == "auto" else "")
            )
            self.log(
                f"sparsity: {fused} of {len(self.mlps)} GELU MLPs run fc1 → GELU → fc2 fused "
                f"({why})"
            )

    @torch.no_grad()
    def _enforce(self, grown: dict[str, torch.Tensor] | None = None) -> None:
        """Zero masked (and newly grown) weights and their AdamW moments."""
        if not self.masked:
            return
        self.stale = False
        self._report_fusion()
        tensors, keeps = [], []  # one foreach multiply over all weights and moments
        for layer in self.layers:
            keep = layer.module.keep
            if grown and layer.name in grown:
                keep = keep * ~layer.spec.expand(grown[layer.name]).to(keep.device)
            state = self.optimizer.state.get(layer.param, {})
            for t in (layer.param, state.get("exp_avg"), state.get("exp_avg_sq")):
                if t is not None:
                    tensors.append(t)
                    keeps.append(keep)
        torch._foreach_mul_(tensors, keeps)

    # -- hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self._rigl_due(step + 1):
            for layer in self.layers:
                if layer.param.grad is not None:
                    self.grow_scores[layer.name] = layer.spec.scores(layer.param.grad).cpu()
        if self.masked and not self.dense:
            pairs = [
                (lay.param.grad, lay.module.keep)
                for lay in self.layers
                if lay.param.grad is not None and not lay.module.grad_is_masked
            ]
            if pairs:
                torch._foreach_mul_(*map(list, zip(*pairs)))
        self._set_dense_now(step + 1)

    def after_optimizer_step(self, step: int) -> None:
        t = step + 1
        algo = self.cfg.algorithm
        grown: dict[str, torch.Tensor] = {}
        if not self.masked and algo != "gmp" and t >= self.cfg.mask_step:
            self.build_masks()
        if algo == "gmp" and alg.gmp_update_due(
            t, self.cfg.start_step, self.end_step, self.cfg.update_every
        ):
            self._gmp(t)
        if (
            algo in ("set", "rigl")
            and self.masked
            and alg.dst_update_due(t, self.cfg.update_every, self.stop_step)
        ):
            grown = self._drop_and_grow(t)
        if algo == "spdf" and self.masked and not self.dense and t >= self.dense_step:
            self._go_dense(t)
        if not self.dense and (self.stale or grown):
            self._enforce(grown)

    def _gmp(self, t: int) -> None:
        frac = alg.gmp_level(t, 1.0, self.cfg.start_step, self.end_step, self.cfg.update_every)
        for layer in self.layers:
            level = (1.0 - layer.density) * frac
            units = layer.spec.units_per_group
            keep = max(round(layer.density * units), round((1.0 - level) * units))
            scores = layer.spec.scores(layer.param)
            self._set(layer, alg.prune_to(layer.kept, scores, keep))
        self._choose_mlps()
        self.masked = True

    def _drop_and_grow(self, t: int) -> dict[str, torch.Tensor]:
        fraction = alg.update_fraction(t, self.cfg.update_fraction, self.stop_step)
        grown_all = {}
        for layer in self.layers:
            drop = layer.spec.scores(layer.param)
            if self.cfg.algorithm == "rigl":
                grow = self.grow_scores.pop(layer.name, None)
                if grow is None:  # no dense gradient (skipped step): regrow nothing new
                    continue
            else:
                grow = torch.rand(layer.kept.shape, generator=self.gen)
            kept, grown = alg.drop_and_grow(layer.kept, drop, grow, fraction)
            self._set(layer, kept)
            grown_all[layer.name] = grown
        self._choose_mlps()
        return grown_all

    def _go_dense(self, t: int) -> None:
        for layer in self.layers:
            self._set(layer, torch.ones_like(layer.kept), kernel="dense")
        self.dense = True
        self.log(f"sparsity: SPDF switched to dense fine-tuning after step {t}")

    def _rigl_due(self, t: int) -> bool:
        return (
            self.cfg.algorithm == "rigl"
            and self.masked
            and alg.dst_update_due(t, self.cfg.update_every, self.stop_step)
        )

    def _set_dense_now(self, next_step: int) -> None:
        """Step index ``next_step`` runs dense when RigL updates after it."""
        dense = self._rigl_due(next_step + 1)
        for layer in self.layers:
            layer.module.dense_now = dense

    # -- metrics -------------------------------------------------------------------------------
    def metrics(self, step: int) -> dict[str, Any]:
        """Mask sparsity (actual, target), zero weights (≥ mask sparsity: regrown weights start
        at zero), and matmul FLOPs per token, fwd+bwd = 6 × weights multiplied (attention
        scores excluded); per-parameter mask sparsity whenever a mask changed."""
        total = sum(layer.param.numel() for layer in self.layers)
        zeros = {
            layer.name: layer.param.numel() - int(layer.param.count_nonzero())
            for layer in self.layers
        }
        masked_out = {layer.name: int((~layer.module.mask).sum()) for layer in self.layers}
        nnz_masks = total - sum(masked_out.values())
        out: dict[str, Any] = {
            "sparsity": sum(masked_out.values()) / total,
            "sparsity_target": self._target_level(step),
            "sparsity_zero_weights": sum(zeros.values()) / total,
            "flops_per_token_dense": 6 * self.flops_dense_params,
            "flops_per_token_sparse": 6 * (self.flops_dense_params - total + nnz_masks),
        }
        if self.changed:
            out["sparsity_per_param"] = {
                layer.name: round(masked_out[layer.name] / layer.param.numel(), 6)
                for layer in self.layers
            }
            self.changed = False
        return out

    def _target_level(self, t: int) -> float:
        numel = {layer.name: layer.param.numel() for layer in self.layers}
        total = sum(numel.values())
        final = sum((1 - layer.density) * numel[layer.name] for layer in self.layers) / total
        cfg = self.cfg
        if cfg.algorithm == "gmp":
            return final * alg.gmp_level(t, 1.0, cfg.start_step, self.end_step, cfg.update_every)
        if self.dense or not self.masked:
            return 0.0
        return final

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            f"mask.{layer.name}": layer.module.mask.detach().cpu().clone() for layer in self.layers
        }
        state["rng"] = self.gen.get_state()
        state["masked"] = self.masked
        state["dense"] = self.dense
        state["kernels"] = {layer.name: layer.module.kernel for layer in self.layers}
        state["dense_now"] = bool(self.layers and self.layers[0].module.dense_now)
        state["mlp_fuse"] = [mlp.fuse for mlp in self.mlps]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["rng"])
        self.masked, self.dense = bool(state["masked"]), bool(state["dense"])
        for layer in self.layers:
            mask = state[f"mask.{layer.name}"].to(torch.bool)
            self._set(layer, layer.spec.to_units(mask), kernel=state["kernels"][layer.name])
            layer.module.dense_now = bool(state["dense_now"])
        self._timed.clear()  # the saved kernels are kept, not timed again
        for mlp, fuse in zip(self.mlps, state.get("mlp_fuse", [])):  # older checkpoints: fuse
            mlp.fuse = bool(fuse)
        if not self.dense:
            self._enforce()


def build_sparsity(
    cfg: SparsityConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    log: Callable[[str], None] = print,
) -> SparsityCallback:
    """Select the matrices, distribute the level, swap in SparseLinear, build initial masks."""
    explicit = select_params(model, cfg)
    linears = linear_weights(model)
    _refuse_dtensor([linears[n][1].weight for n in explicit])
    shapes = {n: tuple(linears[n][1].weight.shape) for n in explicit}
    specs = {n: unit_spec(cfg, n, shapes[n]) for n in explicit}
    densities = distribute(shapes, explicit, cfg.level, cfg.distribution)
    if cfg.distribution == "erk" and cfg.pattern != "unstructured":
        densities = {
            n: d if not math.isnan(explicit[n]) else quantize(d, specs[n])
            for n, d in densities.items()
        }
    layers = []
    for name in explicit:
        path, linear = linears[name]
        module = swap_in(model, path, specs[name].block)
        kept = torch.ones(specs[name].scores(linear.weight).shape, dtype=torch.bool)
        layers.append(Layer(name, module.weight, module, specs[name], densities[name], kept))
    fused = fuse_mlps(model)
    flops_params = sum(m.weight.numel() for _, m in linear_weights(model).values())
    flops_params += sum(m.weight.numel() for m in model.modules() if isinstance(m, SparseLinear))
    if getattr(model, "head", 0) is None and hasattr(model, "tok_emb"):  # tied output head
        flops_params += model.tok_emb.weight.numel()
    callback = SparsityCallback(cfg, layers, optimizer, runtime, flops_params, log)
    callback.mlps = [model.get_submodule(path) for path in fused]
    if cfg.algorithm != "gmp" and cfg.mask_step == 0:
        callback.build_masks()  # raises (naming the parameter) if a level is not achievable
        callback._enforce()
    else:
        _validate_final(cfg, layers)
    kept = sum(layer.density * layer.param.numel() for layer in layers)
    total = sum(layer.param.numel() for layer in layers)
    block = f" (block {cfg.block_size}, balanced {cfg.balanced})" if cfg.pattern == "block" else ""
    log(
        f"sparsity: {len(layers)} matrices, {cfg.algorithm}, pattern {cfg.pattern}{block}, "
        f"{cfg.distribution} → overall level {1 - kept / total:.4f}"
    )
    return callback


def _validate_final(cfg: SparsityConfig, layers: list[Layer]) -> None:
    """Every final mask must be buildable (patterns.py raises, naming the parameter)."""
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        initial_mask(cfg, layer.name, layer.spec, layer.density, layer.param.detach(), gen)


def _refuse_dtensor(params: list[nn.Parameter]) -> None:
    """FSDP2 shards parameters as DTensors; masking local shards is not implemented yet."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise ConfigError(
            "sparsity with parallel.data fsdp is not supported yet; use --parallel.data ddp."
        )
