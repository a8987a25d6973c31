"""The evidence study's arms and timestep bands: what :mod:`noiserater.study.evidence` runs and
:mod:`noiserater.study.evidence_report` reports, in one place below both (the report orders arms as listed here).

Add an arm with one line in :data:`ARMS`.
"""

from __future__ import annotations

from typing import Any

from ..selection import policy_class

# arm name -> (policy, uses k, TrainConfig overrides, rater kind or None). A ``noise_scale`` of "max_norm"
# is the study's E[max-of-k chi_d] / E[chi_d] for the data's dimension d (max_norm's k=1 control), and
# "1/max_norm" its inverse; a policy's name (``knn``) is that policy's noise length measured on the study's
# training split (``selection.policy_norm_scale``: knn's k=1 control); rater kind "random" runs once per
# fresh, never-trained rater initialisation. A ``batch_size`` of "k" is k times the study's batch: vanilla
# spending the soft policies' k DiT passes per image on k times the images instead (their other equal-cost
# control).
ARMS: dict[str, tuple[str, bool, dict[str, Any], str | None]] = {
    "vanilla": ("vanilla", False, {}, None),
    "max_norm": ("max_norm", True, {}, None),
    "min_norm": ("min_norm", True, {}, None),
    "knn": ("knn", True, {}, None),
    "batch_ot": ("batch_ot", False, {}, None),
    "class_ot": ("class_ot", False, {}, None),
    "noise_scale": ("vanilla", False, {"noise_scale": "max_norm"}, None),
    "noise_scale_down": ("vanilla", False, {"noise_scale": "1/max_norm"}, None),
    "noise_scale_knn": ("vanilla", False, {"noise_scale": "knn"}, None),
    "noise_scale_x0.95": ("vanilla", False, {"noise_scale": 0.95}, None),
    "noise_scale_x1.05": ("vanilla", False, {"noise_scale": 1.05}, None),
    "noise_scale_x1.15": ("vanilla", False, {"noise_scale": 1.15}, None),
    "noise_scale_x1.25": ("vanilla", False, {"noise_scale": 1.25}, None),
    "input_perturbation": ("vanilla", False, {"input_perturbation": 0.1}, None),
    "uniform_soft": ("uniform_soft", True, {}, None),
    "vanilla_batch_xk": ("vanilla", False, {"batch_size": "k"}, None),
    "oracle": ("oracle_alignment", True, {}, None),
    "oracle_anti": ("oracle_anti", True, {}, None),
    "oracle_cosine": ("oracle_cosine", True, {}, None),
    "oracle_amortised": ("oracle_alignment", True, {"oracle_every": 10}, None),
    "online": ("rater_online", True, {"online_every": 25, "online_steps": 10, "online_batch": 32}, None),
    "rater": ("rater", True, {}, "bilevel"),
    "rater_sample": ("rater_sample", True, {"temperature": 1.0}, "bilevel"),
    "rater_sample_t0.3": ("rater_sample", True, {"temperature": 0.3}, "bilevel"),
    "rater_soft": ("rater_soft", True, {}, "bilevel"),
    "distilled": ("rater", True, {}, "distill"),
    "distilled_sample": ("rater_sample", True, {"temperature": 1.0}, "distill"),
    "rater_random": ("rater", True, {}, "random"),
    "rater_random_sample": ("rater_sample", True, {"temperature": 1.0}, "random"),
}
# arms whose policy changes the norm of the noise (the registry's ``changes_norm``): also judged against the
# k=1 noise-scale control
NORM_CHANGING = tuple(a for a, (policy, _, _, _) in ARMS.items() if policy_class(policy).changes_norm)
# arms whose policy couples noise to image (knn, batch_ot, class_ot): their models fit another target field
COUPLING = tuple(a for a, (policy, _, _, _) in ARMS.items() if policy_class(policy).couples)
# the k=1 arms that only rescale the noise, and the one each norm-changing arm's scale was built to copy
SCALE_CONTROLS = tuple(a for a, (policy, _, over, _) in ARMS.items() if policy == "vanilla" and "noise_scale" in over)
SCALE_CONTROL_OF = {"max_norm": "noise_scale", "min_norm": "noise_scale_down", "knn": "noise_scale_knn"}
# each trained-rater arm and the random-rater arm that is its null distribution
RANDOM_NULL = {"rater": "rater_random", "rater_sample": "rater_random_sample", "distilled": "rater_random",
               "distilled_sample": "rater_random_sample"}
# the soft policies (k DiT passes per image) and the equal-compute arm that spends those passes on more images
SOFT_ARMS = ("uniform_soft", "rater_soft")
BATCH_CONTROL = "vanilla_batch_xk"
BANDS = ((0, 100), (100, 400), (400, 1000))  # timestep bands of the held-out loss


def band_key(lo: int, hi: int) -> str:
    """The result key of the test-split loss over timesteps in [lo, hi)."""
    return f"test_loss_t{lo}-{hi}"


BAND_KEYS = tuple(band_key(lo, hi) for lo, hi in BANDS)
# the bands as a report writes them: "t<100", "100≤t<400", "t≥400"
BAND_LABELS = tuple(f"t<{hi}" if lo == 0 else f"t≥{lo}" if hi == BANDS[-1][1] else f"{lo}≤t<{hi}" for lo, hi in BANDS)
