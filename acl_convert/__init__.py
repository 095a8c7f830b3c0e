"""acl-convert: turn pretrained CNN convolutions into Analytic Convolutional Layers (ACLs).

Public names (SPEC §5): :func:`convert_model` and :func:`convert_checkpoint` (the one entry
point, returning a :class:`Conversion`), :class:`ACL` (the layer), :func:`load_anann` (AnaNN
checkpoints as modules), :mod:`acl_convert.kernels` (kernel families),
:mod:`acl_convert.pattern` (arrangement patterns, compact factor) and :mod:`acl_convert.fit`
(``fit_kernels``), :func:`demo` (the embedded real sample converted end to end, see
:mod:`acl_convert.sample`).

The sub-packages are the layers of the design: ``kernels`` (families as data), ``nn`` (the ACL
and the per-kernel assignment it is built from), ``fit`` (the fitting engine, selection,
budgets, joint re-solve), ``calibration`` (input statistics, fidelity), ``network`` (finding and
replacing a network's convolutions), ``io`` (checkpoints, architectures, the AnaNN file, images,
output files), ``report`` (report, tables, pictures, AKP tables, writing them), ``train``
(evaluate, fine-tune), ``sample`` (the embedded real sample and the demo); ``pipeline`` joins
them.
"""

__version__ = "0.2.0"

from . import fit, kernels, pattern  # noqa: E402
from .conversion import Conversion  # noqa: E402
from .io.anann import load_anann  # noqa: E402
from .nn.acl import ACL  # noqa: E402
from .pipeline import convert_checkpoint, convert_model  # noqa: E402
from .sample import DemoResult, demo  # noqa: E402
from .settings import Settings  # noqa: E402

__all__ = [
    "__version__",
    "ACL",
    "Conversion",
    "DemoResult",
    "Settings",
    "convert_model",
    "convert_checkpoint",
    "load_anann",
    "demo",
    "fit",
    "kernels",
    "pattern",
]
