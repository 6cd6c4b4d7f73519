"""The one list of CAM methods: name -> how to compute it.

The handler, the CLI and the tests all read this registry, so a method added here is
served, listed and tested everywhere. Names are lowercase and match pytorch-grad-cam's
class names (``GradCAMPlusPlus`` -> ``gradcam++``, ``KPCA_CAM`` -> ``kpcacam``).

``source`` says what a method consumes:

* ``"gradients"``  activations and gradients of the one-hot (or top-k) target run;
* ``"activations"`` activations only (one run per image, whatever the targets);
* ``"finer"``      gradients of FinerCAM's own cotangent (a second graph run);
* ``"score"``      ScoreCAM's masked-input runs of the graph;
* ``"ablation"``   AblationCAM's runs of the head graph on ablated activations;
* ``"fullgrad"``   the ``fullgrad`` extra graph's normalized bias-gradient maps;
* ``"shapley"``    the ``shapley`` extra graph's ReST gradients minus half their Hessian term;
* ``"guided"``     the ``guided`` extra graph's guided input gradient (a picture, not only a map);
* ``"dff"``        Deep Feature Factorization: per-image NMF of the activations into concepts,
  each named by the head graph's classes (:mod:`camserve.cam.dff`); maps per concept, not per target.

``extra`` names the export extra (``camserve export --extras``) a method needs.

``form`` and ``terms`` say how the raw map is built (:mod:`camserve.cam.methods`): a sum
over channel terms, ``"weights"`` (``sum_c w_c A_c``) or ``"elements"`` (``sum_c E_c``),
with ``terms(A, G)`` giving ``w`` or ``E``, or a ``"projection"``. ``explain`` reduces the
terms once into the map and its signal ratio (:mod:`camserve.cam.degenerate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from camserve.errors import InputError
from camserve.cam import methods as m

Source = Literal["gradients", "activations", "finer", "score", "ablation", "fullgrad", "shapley", "guided", "dff"]
RawCam = Callable[..., np.ndarray]
Terms = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    ``function(A, G, eigen_smooth)`` gives raw ``[N, h, w]`` maps from NCHW arrays (FinerCAM:
    GradCAM of its own gradients); for score and ablation it is
    ``function(weights [N, C], A, eigen_smooth)`` over the channel weights their runs give. ``eigen_smooth`` tells whether the flag changes the result
    (the projection methods always project; FEM ignores it, as in pytorch-grad-cam).

    ``form`` is how the raw map is built; ``terms(A, G)`` gives the channel terms of the
    summing methods (weights ``[N, C]`` or elements ``[N, C, h, w]``; FinerCAM: of its own
    gradients) so that ``reduce_terms(form, terms(A, G), A, eigen_smooth)`` is ``function``'s
    map plus its signal ratio. None for projections and for ScoreCAM / AblationCAM, whose
    weights come from their graph runs.
    """

    name: str
    function: RawCam
    source: Source
    eigen_smooth: bool
    summary: str
    form: m.Form = "projection"
    terms: Terms | None = None
    extra: str | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.source in ("gradients", "finer", "shapley")

    @property
    def extra_runs(self) -> bool:
        """Needs graph runs beyond the single explanation run."""
        return self.source in ("finer", "score", "ablation", "fullgrad", "shapley", "guided", "dff")

    @property
    def main_gradients(self) -> bool:
        """Needs the main graph's gradient run (Guided Grad-CAM: for its GradCAM map)."""
        return self.source == "gradients" or self.name == "guidedgradcam"


_SPECS = (
    MethodSpec("gradcam", m.gradcam, "gradients", True, "channels weighted by mean gradient", "weights", m.gradcam_weights),
    MethodSpec("hirescam", m.hirescam, "gradients", True, "element-wise gradient x activation", "elements", m.hirescam_elements),
    MethodSpec("gradcamelementwise", m.gradcam_elementwise, "gradients", True, "ReLU of gradient x activation",
               "elements", m.gradcam_elementwise_elements),
    MethodSpec("gradcam++", m.gradcam_plus_plus, "gradients", True, "higher-order gradient weights",
               "weights", m.gradcam_plus_plus_weights),
    MethodSpec("xgradcam", m.xgradcam, "gradients", True, "activation-normalized gradient weights", "weights", m.xgradcam_weights),
    MethodSpec("layercam", m.layercam, "gradients", True, "positive gradients as per-position weights", "elements", m.layercam_elements),
    MethodSpec("eigencam", m.eigencam, "activations", False, "first principal component of activations"),
    MethodSpec("eigengradcam", m.eigengradcam, "gradients", False, "first principal component of gradient x activation"),
    MethodSpec("segeigencam", m.segeigencam, "gradients", False,
               "sign-corrected first principal component of |gradient| x activation"),
    MethodSpec("kpcacam", m.kpcacam, "activations", False, "sigmoid-kernel PCA of activations"),
    MethodSpec("fem", m.fem, "activations", False, "channels weighted by their k-sigma outlier share", "weights", m.fem_weights),
    MethodSpec("scorecam", m.weighted_sum, "score", True, "softmax of target scores of activation-masked inputs", "weights"),
    MethodSpec("ablationcam", m.weighted_sum, "ablation", True, "relative score drop when a channel is ablated", "weights"),
    MethodSpec("finercam", m.gradcam, "finer", True, "GradCAM of the target against its most similar classes",
               "weights", m.gradcam_weights),
    MethodSpec("fullgrad", m.gradcam, "fullgrad", False, "normalized bias-gradients of every layer plus input-gradient",
               extra="fullgrad"),
    MethodSpec("shapleycam", m.gradcam, "shapley", True, "gradient minus half the Hessian term, ReST target",
               "weights", m.gradcam_weights, extra="shapley"),
    MethodSpec("guidedbackprop", m.gradcam, "guided", False, "input gradient through guided ReLUs (a picture)",
               extra="guided"),
    MethodSpec("guidedgradcam", m.gradcam, "guided", True, "GradCAM times the guided input gradient (a picture)",
               extra="guided"),
    MethodSpec("dff", m.gradcam, "dff", False, "concepts: per-image NMF of activations, named by the head's classes"),
)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def available_methods() -> list[str]:
    """All method names, in registry order."""
    return list(REGISTRY)


def get_method(name: object) -> MethodSpec:
    """The spec for ``name`` (case-insensitive); InputError naming it and the valid ones if unknown."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in REGISTRY:
        raise InputError(f"unknown CAM method {name!r}; valid methods: {', '.join(REGISTRY)}")
    return REGISTRY[key]
