"""Pure planning math: FLOPs, Chinchilla allocation, scaling-law fits, device peaks.

Nothing heavy is imported here: torch only inside the CPU/GPU measuring function, numpy and
scipy only inside the fitting and plotting functions.
"""

from kiln.planning.chinchilla import (
    CEREBRAS_GPT,
    PRESET_SHAPES,
    params_for_flops,
    shape_for_params,
    tokens_for,
)
from kiln.planning.flops import (
    Shape,
    cerebras_flops,
    chinchilla_flops_per_token,
    flops_6nd_plus_attention,
    flops_per_token,
    param_count,
    training_flops,
)
from kiln.planning.hardware import PEAK_FLOPS, device_peak, measure_cpu_peak, peak_flops
from kiln.planning.plan import Plan, format_plan, make_plan
from kiln.planning.scaling import (
    ChinchillaFit,
    FitError,
    PowerLawFit,
    fit_chinchilla,
    fit_power_law,
    load_fit,
    plot_fit,
)

__all__ = [
    "CEREBRAS_GPT", "PEAK_FLOPS", "PRESET_SHAPES", "ChinchillaFit", "FitError", "Plan",
    "PowerLawFit", "Shape", "cerebras_flops", "chinchilla_flops_per_token", "device_peak",
    "fit_chinchilla", "fit_power_law", "flops_6nd_plus_attention", "flops_per_token",
    "format_plan", "load_fit", "make_plan", "measure_cpu_peak", "param_count", "params_for_flops",
    "peak_flops", "plot_fit", "shape_for_params", "tokens_for", "training_flops",
]  # fmt: skip
