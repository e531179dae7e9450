"""The ``sparsity`` config section: which weights are pruned, how far, by which algorithm and
kernel, and its pattern checks. Re-exported by kiln.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError, check_choice, check_positive

SPARSE_DEFAULT_INCLUDE = ["blocks.*.attn.w*.weight", "blocks.*.mlp.w*.weight"]


@dataclass
class SparsityConfig:
    """Sparse training (kiln.sparsity): which matrices, how sparse, which pattern and algorithm.

    Off by default (level 0 and no per_param): nothing changes for dense runs.
    """

    level: float = 0.0
    """Overall target sparsity of the selected matrices (0 = off; e.g. 0.875 keeps 1 in 8)."""
    per_param: dict[str, float] = field(default_factory=dict)
    """Glob over parameter names → sparsity level for those parameters (overrides level)."""
    pattern: str = "block"
    """'unstructured', 'N:M' (e.g. '2:4', N kept in every M inputs) or 'block' (b×b blocks)."""
    block_size: int = 32
    """Block edge for pattern 'block' (kernel: multiple of 32). 64 is faster per matrix but
    must divide every matrix and, balanced, hold the level per line: 87.5% needs d % 512 == 0
    (tiny's 256 and 111m's 768 attention fail), so the default stays 32."""
    balanced: bool = True
    """Block pattern: every block-row (or block-column) keeps the same number of blocks."""
    distribution: str = "uniform"
    """How level is spread over matrices: 'uniform' or 'erk' (density ∝ (in+out)/(in·out))."""
    include: list[str] = field(default_factory=lambda: list(SPARSE_DEFAULT_INCLUDE))
    """Globs of parameter names made sparse by level (embeddings, norms, biases, head: dense)."""
    algorithm: str = "static"
    """'static' (fixed mask), 'gmp' (gradual magnitude pruning), 'set', 'rigl' or 'spdf'."""
    init: str = "random"
    """How a static/SET/RigL/SPDF mask is first chosen: 'random' or 'magnitude'."""
    mask_step: int = 0
    """Train dense until this many steps are done, then compute the masks (0 = at init)."""
    start_step: int = 0
    """GMP: the step at which pruning starts (from dense)."""
    end_step: int | None = None
    """GMP: the step at which the final level is reached (None = 75% of train.max_steps)."""
    update_every: int = 100
    """GMP pruning interval and SET/RigL mask-update interval ΔT, in steps."""
    update_fraction: float = 0.3
    """SET/RigL: fraction α of kept weights dropped and regrown at step 0 (cosine-decayed)."""
    stop_step: int | None = None
    """SET/RigL: last step with mask updates, T_end (None = 75% of train.max_steps)."""
    dense_step: int | None = None
    """SPDF: sparse until this step, dense fine-tuning after (None = 75% of train.max_steps)."""
    kernel: str = "auto"
    """Forward kernel: 'auto' (fastest measured per shape: dense, masked or a sparse kernel),
    'dense' (plain matmul on the zero-filled weight), 'masked' (dense × mask) or 'block'."""

    def __post_init__(self) -> None:
        _check_level("sparsity.level", self.level)
        for glob, value in self.per_param.items():
            _check_level(f"sparsity.per_param[{glob!r}]", value)
        nm = _parse_nm(self.pattern)
        if nm is None:
            check_choice("sparsity", "pattern", self.pattern, ["unstructured", "block", "N:M"])
        check_positive("sparsity", "block_size", self.block_size)
        check_choice("sparsity", "distribution", self.distribution, ["uniform", "erk"])
        check_choice(
            "sparsity", "algorithm", self.algorithm, ["static", "gmp", "set", "rigl", "spdf"]
        )
        check_choice("sparsity", "init", self.init, ["random", "magnitude"])
        check_choice("sparsity", "kernel", self.kernel, ["auto", "dense", "masked", "block"])
        for name in ("mask_step", "start_step", "end_step", "stop_step", "dense_step"):
            check_positive("sparsity", name, getattr(self, name), allow_zero=True)
        check_positive("sparsity", "update_every", self.update_every)
        if not 0.0 < self.update_fraction <= 1.0:
            raise ConfigError(
                f"sparsity.update_fraction is {self.update_fraction} but must be in (0, 1]."
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ConfigError(
                f"sparsity.end_step is {self.end_step} but must be after start_step "
                f"{self.start_step}."
            )
        if nm is not None:
            self._check_nm(*nm)
        if self.kernel == "block" and (self.pattern != "block" or self.block_size % 32):
            raise ConfigError(
                f"sparsity.kernel 'block' needs pattern 'block' with a block_size that is a "
                f"multiple of 32, got pattern {self.pattern!r} and block_size {self.block_size}."
            )

    def _check_nm(self, n: int, m: int) -> None:
        implied = 1.0 - n / m
        named = [(f"per_param[{g!r}]", v) for g, v in self.per_param.items()]
        for where, value in [("level", self.level), *named]:
            if value and abs(value - implied) > 1e-9:
                raise ConfigError(
                    f"sparsity.{where} is {value} but pattern {n}:{m} fixes the level at "
                    f"{implied:g}; set it to {implied:g} or choose another pattern."
                )
        if self.algorithm == "gmp":
            raise ConfigError(
                f"sparsity.algorithm 'gmp' changes the level, which pattern {n}:{m} fixes; "
                "use 'unstructured' or 'block' with gmp."
            )

    @property
    def enabled(self) -> bool:
        """True when any parameter is made sparse."""
        return self.level > 0 or any(v > 0 for v in self.per_param.values())


def _check_level(where: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} is {value} but must be in [0, 1) (e.g. 0.875 keeps 1 in 8).")


def _parse_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) for an 'N:M' pattern string, None for any other; N > M is an error."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ConfigError(f"sparsity.pattern is {pattern!r} but N:M needs 0 < N <= M (e.g. '2:4').")
    return n, m
