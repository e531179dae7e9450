"""The training loop: already-built parts in, optimizer steps out.

The trainer receives the model parts this rank holds (one per pipeline stage, with what runs
them: kiln.distributed.parallelize.Parallelized), the training plan, the device mesh, the
optimizer, LR schedule, data loader and validation batches; it owns only the loop, its counters
(``TrainState``) and the guards: non-finite loss or gradient norm skips the step, too many in a
row stop the run, and SIGTERM/SIGINT end it after a final checkpoint. Under torch.distributed
the stop request is all-reduced (MAX) every step, so a signal that reaches one rank stops all of
them at the same step instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import TrainConfig
from kiln.errors import KilnError
from kiln.models.loss import head_loss, logits_loss
from kiln.models.moe import pop_aux_loss
from kiln.train.callbacks import Callback
from kiln.train.faults import crash_point

if TYPE_CHECKING:
    from kiln.distributed.parallel_dims import ParallelDims
    from kiln.distributed.parallelize import Parallelized
    from kiln.train.plan import TrainingPlan


@dataclass
class TrainState:
    """Counters that a checkpoint restores (plain JSON values: they live in kiln.json)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    consecutive_bad: int = 0
    last_checkpoint_step: int | None = None
    recent_losses: list[float] = field(default_factory=list)
    """The last ``log_every`` finite losses (final_train_loss is their mean)."""
    last_val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Hooks:
    """What the trainer calls out to (kept as plain callables so tests can stub them)."""

    log: Callable[[str], None] = print
    write_metrics: Callable[[dict[str, Any]], None] = lambda record: None
    save_checkpoint: Callable[[], None] = lambda: None


class TrainingStopped(KilnError):
    """Too many consecutive non-finite steps."""


def autocast(device: torch.device, precision: str):
    """bf16 autocast with fp32 master weights, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside a DDP wrapper (FSDP2 and TP modify the module in place)."""
    return getattr(model, "module", model)


def make_loss_fn(model: nn.Module, device: torch.device, precision: str, compile: bool, loss=None):
    """x, y → mean cross entropy under the run's precision: the model returns final-normed
    hidden states and the loss component ``loss(model, h, y)`` applies the head (default
    :func:`kiln.models.loss.head_loss`, the head and the loss fused a chunk of tokens at a
    time; under TP a loss-parallel variant). With ``compile``, the model and the unfused
    loss are compiled as one graph, so Inductor fuses the casts, the fp32 log-softmax over the
    vocabulary and its backward (measured 1.4× over eager on a 111M-width model on CPU, against
    1.1× for compiling block by block)."""
    plain = unwrap(model)
    plain.output_hidden = True
    loss = loss or (logits_loss if compile else head_loss)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return loss(plain, model(x), y)

    return torch.compile(loss_fn) if compile else loss_fn


def _all_reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over ``group`` (the data-parallel ranks; None = the whole world)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value /= dist.get_world_size(group)
    return value


def _no_sync(model: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP and FSDP2)."""
    if hasattr(model, "no_sync") and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip to ``max_norm`` by the norm over ALL of the model's gradients. Sharded (DTensor)
    ones count once through their full norm, computed per device mesh over that mesh's ranks
    (FSDP2/TP shards on the data/tensor mesh, experts on the expert-parallel mesh), and plain
    (replicated) ones locally: total² = Σ over meshes of its norm², plus the plain norm². Under
    pipeline parallelism the stages' squared norms are summed over ``pp_group``. Returns that
    total norm."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        sq = sq + norm.float().to(device) ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:  # as torch's clip_grads_with_norm_, per mesh (DTensors don't mix meshes)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


class Trainer:
    """Runs optimizer steps until ``total_steps``, logging, validating and checkpointing."""

    def __init__(
        self,
        parts: Parallelized,
        optimizer: torch.optim.Optimizer,
        schedule,
        loader,
        val_batches: list[tuple[torch.Tensor, torch.Tensor]],
        cfg: TrainConfig,
        plan: TrainingPlan,
        dims: ParallelDims,
        *,
        log_every: int = 10,
        checkpoint_every: int = 0,
        progress: bool = False,
        hooks: Hooks | None = None,
        callbacks: list[Callback] | None = None,
        compile_loss: bool = False,
    ):
        """``parts``: the model parts this rank holds (one per pipeline stage) and what runs
        them (kiln.distributed.parallelize.parallelize_model); ``plan``: the training plan
        (steps, batch and micro-batch, sequence length, FLOPs per token, peak; a test or probe
        without a job uses kiln.train.plan.loop_plan); ``dims``: the mesh the reductions take
        their groups from."""
        model = parts.train_model
        self.model_parts = parts.model_parts
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loader, self.val_batches, self.cfg = loader, val_batches, cfg
        self.device, self.total_steps = dims.device, plan.steps
        self.micro, self.seq_len, self.global_batch = (
            plan.micro_batch_size,
            plan.seq_len,
            plan.batch_size,
        )
        self.flops_per_token, self.peak_flops = plan.flops_per_token, plan.peak_flops
        self.world_size, self.log_every, self.checkpoint_every = (
            plan.world_size,
            log_every,
            checkpoint_every,
        )
        self.progress = progress
        self.hooks = hooks or Hooks()
        self.callbacks = list(callbacks or [])
        self.dims = dims
        """kiln.distributed.ParallelDims: the mesh reductions take their groups from."""
        loss = parts.loss
        self.loss_fn = make_loss_fn(model, self.device, cfg.precision, compile_loss, loss)
        self.pipeline = parts.pipeline
        """kiln.distributed.pipeline.Pipeline: runs forward + backward of a batch through this
        rank's stages (``model`` is then a ModuleList of them)."""
        self.finish_grads = parts.finish_grads
        """Called once after the step's last backward, before clipping (expert gradients
        under expert parallelism: kiln.distributed.parallelize.Parallelized.finish_grads)."""
        self.loss_context = getattr(loss, "context", contextlib.nullcontext)
        """Forward and backward of the loss run inside it (``loss_parallel`` under TP)."""
        self.state = TrainState()
        self.stop_requested: str | None = None
        """Set when all ranks have agreed to stop (the loop reads only this)."""
        self._signalled: str | None = None
        """Set asynchronously by the signal handler on this rank."""
        self.last_loss = math.nan

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """Forward/backward over the micro-batches of one global batch, then (maybe) step.

        Returns (loss, grad_norm); a non-finite one means the step was skipped.
        """
        x, y = self.loader.next_batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.pipeline is not None:  # the schedule splits the batch into its micro-batches
            with autocast(self.device, self.cfg.precision), self.loss_context():
                total = self.pipeline.step(x, y)
        else:
            total = self._accumulate(x, y)
        if self.finish_grads is not None:
            self.finish_grads()
        loss_value = _all_reduce_mean(total, self._dp_group).item()
        for cb in self.callbacks:
            cb.after_backward(self.state.step)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(clip_grad_norm(self.model.parameters(), max_norm, self._pp_group))
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.state.consecutive_bad = 0
            for cb in self.callbacks:
                cb.after_optimizer_step(self.state.step)
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward/backward micro-batch by micro-batch; the mean loss (gradients summed)."""
        chunks = list(zip(x.split(self.micro), y.split(self.micro)))
        total = torch.zeros((), device=self.device)
        for i, (xb, yb) in enumerate(chunks):
            with _no_sync(self.model, last=i == len(chunks) - 1), self.loss_context():
                loss = self.loss_fn(xb, yb) / len(chunks)
                aux = pop_aux_loss(self.model)  # MoE balancing losses (logged apart)
                (loss if aux is None else loss + aux / len(chunks)).backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        for x, y in self.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            if self.pipeline is not None:
                with autocast(self.device, self.cfg.precision), self.loss_context():
                    losses.append(self.pipeline.evaluate(x, y))
                continue
            for xb, yb in zip(x.split(self.micro), y.split(self.micro)):
                with self.loss_context():
                    losses.append(self.loss_fn(xb, yb).float())
        self.model.train(was_training)
        value = torch.stack(losses).mean() if losses else torch.tensor(math.nan)
        return _all_reduce_mean(value, self._dp_group).item()

    @property
    def _dp_group(self):
        return self.dims.group("dp")

    @property
    def _pp_group(self):
        return self.dims.group("pp") if self.dims.pp > 1 else None

    # -- the loop --------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        previous = {}

        def request_stop(signum, _frame):
            self._signalled = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests)
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            desc="train",
        )

    def fit(self) -> TrainState:
        """Train from ``state.step`` to ``total_steps`` (or until stopped)."""
        previous = self._install_signal_handlers()
        bar = self._bar()
        tokens_per_step = self.global_batch * self.seq_len
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.state.step < self.total_steps and self.stop_requested is None:
                step = self.state.step
                lr = self.schedule.apply(self.optimizer, step)
                loss, grad_norm = self.train_step()
                self.state.step += 1
                self.state.tokens += tokens_per_step
                window_tokens += tokens_per_step
                self.last_loss = loss
                if math.isfinite(loss):
                    recent = self.state.recent_losses + [loss]
                    self.state.recent_losses = recent[-self.log_every :]
                if self.state.consecutive_bad >= self.cfg.max_bad_steps:
                    last = self.state.last_checkpoint_step
                    raise TrainingStopped(
                        f"Stopped at step {self.state.step}: {self.state.consecutive_bad} "
                        "consecutive steps had a non-finite loss or gradient norm; "
                        + (
                            f"the last good checkpoint is step {last}."
                            if last is not None
                            else "no checkpoint had been saved yet."
                        )
                    )
                done = self.state.step == self.total_steps
                evaluate = done or (
                    self.cfg.eval_every and self.state.step % self.cfg.eval_every == 0
                )
                if self.state.step % self.log_every == 0 or evaluate:
                    tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    self._log(loss, lr, grad_norm, tps, evaluate)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                crash_point(f"step:{self.state.step}")  # test-only; no-op unless the env var is set
                self._agree_to_stop()
                if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                    self._checkpoint()
                if bar is not None:
                    bar.update(1)
            if self.stop_requested is not None:
                self.hooks.log(
                    f"Received {self.stop_requested} at step {self.state.step}: "
                    "saving a final checkpoint."
                )
            if self.state.last_checkpoint_step != self.state.step:
                self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.state

    def _log(self, loss: float, lr: float, grad_norm: float, tps: float, evaluate: bool) -> None:
        """One metrics.jsonl line (plus callbacks' fields, plus val_loss on validation steps)."""
        record = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / (self.peak_flops * self.world_size),
            "skipped_steps": self.state.skipped_steps,
        }
        for cb in self.callbacks:
            record.update(cb.metrics(self.state.step))
        if evaluate:
            self.state.last_val_loss = self.evaluate()
            record["val_loss"] = self.state.last_val_loss
        self.hooks.write_metrics(record)

    def _agree_to_stop(self) -> None:
        """All ranks stop at the same step if any of them received SIGTERM/SIGINT (the handler
        may fire at any moment, so one snapshot of it is what this rank votes with)."""
        signalled = self._signalled
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self.stop_requested = signalled
            return
        flag = torch.tensor([0 if signalled is None else 1], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stop_requested = signalled or "a stop request on another rank"

    def _checkpoint(self) -> None:
        self.state.last_checkpoint_step = self.state.step
        self.hooks.save_checkpoint()

    @property
    def final_train_loss(self) -> float:
        """Mean of the last ``log_every`` finite step losses (less noisy than one step)."""
        if not self.state.recent_losses:
            return math.nan
        return sum(self.state.recent_losses) / len(self.state.recent_losses)

    @property
    def last_val_loss(self) -> float | None:
        return self.state.last_val_loss
