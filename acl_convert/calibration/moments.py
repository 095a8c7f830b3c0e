"""What a layer really sees: second moments of its input patches on calibration images.

The activation-weighted fit (:mod:`acl_convert.fit.metric`) needs, per converted conv, the
uncentred second moment ``E[x x^T]`` of the patches its kernels are applied to. They are
collected by running the calibration images through the network *as converted so far*, so a
layer is fitted to the inputs it will get in the AnaNN, and errors of earlier layers do not
compound unseen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from ..errors import UserError
from ..fit.metric import channel_blocks

__all__ = ["Calibration", "LayerMoments", "execution_order"]


#: Bytes of one float64 copy of patches when summing the moments (see :data:`PIECE_BYTES`).
_CHUNK_BYTES = 16 << 20
#: Bytes of the largest tensor (a layer's input patches, or any module's output on the way to
#: it) of one piece: the images of a batch are run through the network in pieces this small.
#: glibc serves allocations over 32 MiB with fresh ``mmap`` pages, so larger
#: temporaries (patches, activations) are page-faulted in anew every batch; measured on
#: MobileNetV2 (every 3x3 conv, 256 images in batches of 16): 158 s wall with 144 s of system
#: time in whole batches, 79-95 s with 23-43 s in pieces (docs/performance.md).
PIECE_BYTES = 24 << 20


class _Stop(Exception):
    """Raised by the collecting hook: nothing after the layer is needed."""


@dataclass
class LayerMoments:
    """Second moments of one conv's input patches.

    Attributes:
        full: ``(G, D + 1, D + 1)`` float64, per conv group, over patches ``[x; 1]`` with
            ``D = Ci/groups * h * w`` (input channel major, then the kernel's row-major pixels,
            the order of ``weight[q].flatten()``); the appended 1 carries the bias and the mean.
        kernel_size: ``(h, w)``.
        count: patches averaged (images times output positions).
        cross: ``(G, D + 1, Co/G)`` float64 ``E[[x; 1] y_ref^T]``: the patches against the
            same layer's output in a reference (the original) network, bias included, or None.
            It is the cross moment of the two networks' patches times the reference weights
            (``E[[x; 1] [x_ref; 1]^T] [w; b]``), all the compensated target needs, at ``Co/G``
            columns instead of ``D + 1``.
        half: with ``cross``, the same moments over the odd-numbered calibration images alone
            (None with fewer than two): what a choice fitted on the other half (the even
            images) is checked on, see :func:`acl_convert.calibration.compensate.compensated`.
    """

    full: Tensor
    kernel_size: tuple[int, int]
    count: int
    cross: Tensor | None = None
    half: LayerMoments | None = None

    @property
    def groups(self) -> int:
        return self.full.shape[0]

    def blocks(self) -> Tensor:
        """``(Ci, n, n)``: the diagonal block of every input channel (``n = h*w``), the moment
        that weights a single kernel's residual."""
        h, w = self.kernel_size
        return channel_blocks(self.full, h * w)


def execution_order(model: nn.Module, names: Sequence[str], example: Tensor) -> list[str]:
    """``names`` sorted by when their module first runs on ``example`` (``(1, 3, H, W)``);
    modules that never run keep their given order at the end."""
    seen: list[str] = []
    handles = []
    for name in names:

        def hook(_m, _inp, name=name):
            if name not in seen:
                seen.append(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


class Calibration:
    """Preprocessed calibration images, held in memory (``(B, C, H, W)`` batches), and the
    moments of any conv's inputs on them.

    Args:
        batches: the images, already preprocessed as the network expects: an iterable of
            ``(B, C, H, W)`` float tensors, or of ``(images, labels)`` pairs (a ``DataLoader``
            over a labelled dataset; the labels are not used). Read once.
        limit: keep at most this many images (None: all).
    """

    def __init__(self, batches: Iterable, *, limit: int | None = None) -> None:
        self.batches = _image_batches(batches, limit)
        if not self.batches:
            raise UserError("no calibration images; give at least one image")

    @property
    def images(self) -> int:
        return sum(len(b) for b in self.batches)

    @torch.no_grad()
    def moments(
        self,
        model: nn.Module,
        name: str,
        progress: Callable[[int], None] | None = None,
        reference: nn.Module | None = None,
    ) -> LayerMoments:
        """Run the images through ``model`` up to the conv ``name`` and average ``[x; 1][x; 1]^T``
        over all its input patches (zero padding included, as the conv sees it). With
        ``reference`` (the original network), also average ``[x; 1] y_ref^T`` with the same
        layer's output there, image by image and position by position. ``progress(images)`` is
        called after every piece of images (see :data:`PIECE_BYTES`)."""
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d) and not hasattr(conv, "kernel_size"):
            raise UserError(f"{name} is not a convolution; cannot collect its inputs")
        h, w = conv.kernel_size
        groups = conv.groups
        d = conv.in_channels // groups * h * w
        per_group = conv.out_channels // groups
        # With a reference, the even- and odd-numbered images are summed apart: the odd ones'
        # moments are the half that the compensation's ridge is validated on.
        sums = [_Sums.zeros(groups, d, per_group if reference is not None else 0)]
        if reference is not None:
            sums.append(_Sums.zeros(groups, d, per_group))
        seen, size = 0, [1]  # images per piece: the first alone, to learn what one allocates
        for n, x in enumerate(_pieces(self.batches, lambda: size[0])):
            with _largest_output() if n == 0 else nullcontext([0]) as largest:
                cols = _patches(model, name, x)  # (G, D, B * L)
            if n == 0:
                per_image = max(largest[0], cols.numel() * cols.element_size())
                size[0] = max(1, PIECE_BYTES // max(per_image, 1))
            ref = None if reference is None else _outputs(reference, name, x, groups)
            if ref is not None and ref.shape[2] != cols.shape[2]:
                raise UserError(
                    f"layer {name} gives {ref.shape[2]} outputs for {cols.shape[2]} patches in "
                    "the original network; its padding or stride is not what the module says"
                )
            if len(sums) == 1:
                sums[0].add(cols, ref)
            else:
                for parity, half in enumerate(sums):
                    picked = [i for i in range(len(x)) if (seen + i) % 2 == parity]
                    if len(picked) == len(x):  # a piece of one image has one parity
                        half.add(cols, ref)
                    elif picked:
                        half.add(*(_images(t, len(x), picked) for t in (cols, ref)))
            seen += len(x)
            if progress is not None:
                progress(len(x))
        whole = sums[0] if len(sums) == 1 else sums[0].merged(sums[1])
        if whole.count == 0:
            raise UserError(f"layer {name} never ran on the calibration images")
        out = whole.moments((h, w))
        if len(sums) == 2 and sums[0].count and sums[1].count:
            out.half = sums[1].moments((h, w))
        return out


@dataclass
class _Sums:
    """Running float64 sums of ``[x; 1][x; 1]^T`` (and of ``[x; 1] y_ref^T``) over a set of
    patches."""

    total: Tensor
    cross: Tensor | None
    count: int = 0

    @classmethod
    def zeros(cls, groups: int, d: int, outputs: int) -> _Sums:
        """Empty sums; ``outputs``: the reference's columns per group (0: no reference)."""
        total = torch.zeros(groups, d + 1, d + 1, dtype=torch.float64)
        cross = torch.zeros(groups, d + 1, outputs, dtype=torch.float64) if outputs else None
        return cls(total, cross)

    def add(self, cols: Tensor, ref: Tensor | None) -> None:
        """Add patches ``x`` ``(G, D, P)`` (and the reference outputs ``(G, Co/G, P)``); the
        constant coordinate of ``[x; 1]`` is summed here, not stored with them."""
        # Summed in float64: a float32 product over thousands of patches is off by ~1e-8 of the
        # largest eigenvalue, more than the smallest eigenvalues of smooth images' patch moments
        # (3e-12 of the largest on the tests' blurred noise), so S came out indefinite, the
        # joint re-solve minimised a non-convex quadratic along those directions, the channel
        # sweeps could raise the output error (1.2 -> 2.7 on a toy layer), and both followed
        # the CPU's float32 summation order (MKL's differs between Intel and AMD). Chunks of
        # patches bound the float64 copies.
        g, d, patches = cols.shape
        wide = max(d, 0 if ref is None else ref.shape[1])
        chunk = max(1, _CHUNK_BYTES // (8 * g * wide))
        for lo in range(0, patches, chunk):
            part = cols[:, :, lo : lo + chunk].double()
            self.total[:, :d, :d].add_(part @ part.transpose(1, 2))
            self.total[:, :d, d].add_(part.sum(2))
            if self.cross is not None:
                out = ref[:, :, lo : lo + chunk].double()
                self.cross[:, :d].add_(part @ out.transpose(1, 2))
                self.cross[:, d].add_(out.sum(2))
        self.total[:, d, :d] = self.total[:, :d, d]  # symmetric
        self.total[:, d, d] += patches
        self.count += patches

    def merged(self, other: _Sums) -> _Sums:
        """Both sets of patches together."""
        cross = None if self.cross is None else self.cross + other.cross
        return _Sums(self.total + other.total, cross, self.count + other.count)

    def moments(self, kernel_size: tuple[int, int]) -> LayerMoments:
        return LayerMoments(
            full=self.total / self.count,
            kernel_size=kernel_size,
            count=self.count,
            cross=None if self.cross is None else self.cross / self.count,
        )


@contextmanager
def _largest_output() -> Iterator[list[int]]:
    """``[bytes]`` of the largest tensor output by any module while inside."""
    largest = [0]

    def hook(_m, _inputs, out):
        if isinstance(out, Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handle = register_module_forward_hook(hook)
    try:
        yield largest
    finally:
        handle.remove()


def _pieces(batches: list[Tensor], size: Callable[[], int]) -> Iterator[Tensor]:
    """The images of ``batches`` in order, as views of at most ``size()`` images each (asked
    before every piece), never across two batches."""
    for x in batches:
        start = 0
        while start < len(x):
            n = size()
            yield x[start : start + n]
            start += n


def _images(columns: Tensor, images: int, picked: list[int]) -> Tensor:
    """The columns of the ``picked`` images among ``images`` (each ``L`` consecutive ones, as
    :func:`_patches` and :func:`_outputs` lay them out)."""
    g, rows, total = columns.shape
    per_image = columns.view(g, rows, images, total // images)
    return per_image[:, :, picked].reshape(g, rows, -1)


def _image_batches(batches: Iterable, limit: int | None) -> list[Tensor]:
    """The image tensors of ``batches`` (pairs give their first element), at most ``limit``
    images in all, each checked to be a finite ``(B, C, H, W)`` floating-point tensor."""
    if isinstance(batches, Tensor):
        batches = [batches]
    out: list[Tensor] = []
    seen = 0
    for n, item in enumerate(batches):
        if limit is not None and seen >= limit:
            break
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            what = type(x).__name__ if not isinstance(x, Tensor) else f"{x.dtype} {tuple(x.shape)}"
            raise UserError(
                f"calibration batch {n} is {what}; give (B, C, H, W) float image tensors, or "
                "(images, labels) pairs"
            )
        x = x.detach().cpu()
        x = x[None] if x.ndim == 3 else x
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"calibration batch {n} has NaN or Inf values; check the images")
        if limit is not None:
            x = x[: limit - seen]
        out.append(x)
        seen += len(x)
    return out


def _outputs(model: nn.Module, name: str, x: Tensor, groups: int) -> Tensor:
    """The output of the conv ``name`` of ``model`` on images ``x``, ``(G, Co/G, B * L)`` in
    the order of :func:`_patches`'s columns (a hook stops the forward pass after the conv)."""
    found: list[Tensor] = []

    def hook(_m, _inputs, out):
        b, co = out.shape[:2]
        y = out.float().reshape(b, groups, co // groups, -1)
        found.append(y.permute(1, 2, 0, 3).reshape(groups, co // groups, -1))
        raise _Stop

    _run_until(model, name, x, model.get_submodule(name).register_forward_hook(hook))
    return found[0]


def _run_until(model: nn.Module, name: str, x: Tensor, handle) -> None:
    """Run ``model`` on ``x`` until the hook ``handle`` on the module ``name`` stops it, then
    remove the hook."""
    model.eval()
    try:
        model(x)
    except _Stop:
        return
    finally:
        handle.remove()
    raise UserError(f"layer {name} never ran on the calibration images")


def _patches(model: nn.Module, name: str, x: Tensor) -> Tensor:
    """The input patches ``x`` of the conv ``name`` of ``model`` on images ``x``,
    ``(G, D, B * L)`` (a hook stops the forward pass at the conv); for one image, a view of the
    unfolded input (no copy)."""
    conv = model.get_submodule(name)
    h, w = conv.kernel_size
    groups = conv.groups
    padding = conv.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise UserError(
                f"layer {name} uses padding={padding!r}; calibration supports numeric padding only"
            )
        padding = (0, 0)
    d = conv.in_channels // groups * h * w
    found: list[Tensor] = []

    def hook(_m, inputs):
        x = inputs[0].float()
        pad = padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            pad = (0, 0)
        cols = F.unfold(x, (h, w), conv.dilation, pad, conv.stride)  # (B, Ci*h*w, L)
        b, _, positions = cols.shape
        cols = cols.view(b, groups, d, positions).permute(1, 2, 0, 3)
        found.append(cols.reshape(groups, d, b * positions))
        raise _Stop

    _run_until(model, name, x, conv.register_forward_pre_hook(hook))
    return found[0]
