"""The Analytic Convolutional Layer (ACL): a drop-in ``nn.Conv2d`` whose kernels are a mosaic of
analytic kernels (ACKs) and plain kernels (paper §3.2-3.3).

Kernel ``k`` of the layer is ``weight.view(-1, h, w)[k]``, i.e. ``k = q * (Ci/groups) + p`` for
output channel ``q`` and input channel ``p`` (SPEC §3). Each kernel has a family code. Per family
present, the layer holds one tensor of AKPs (kept unconstrained, see
:meth:`KernelFamily.from_unconstrained`), optionally one of gains and one of offsets
(``kernel = gain * f(AKPs) + offset``, SPEC §2), and an index buffer saying which kernels it owns.
Plain kernels are one ``(n_plain, h, w)`` tensor.

The synthesised weight is a derived tensor: rebuilt on every call in training mode, cached in
``eval()`` so inference costs what a plain convolution costs, and dropped again by ``train()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, pattern

__all__ = ["ACL"]

_PLAIN = "P"


class ACL(nn.Module):
    """Analytic Convolutional Layer.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: exactly as :class:`torch.nn.Conv2d` (validated by it, too).
        assignment: the family code of every kernel: a sequence of ``Co * Ci/groups`` codes
            (kernel order as above), or an arrangement pattern (counts or ratio form, Eqs. 9-10).
        gain: give every ACK a learnable gain (SPEC §2). Off for layers built from a pattern.
        offset: give every ACK (except Mean, which is already constant) a learnable offset.

    Parameters are initialised like ``nn.Conv2d`` for plain kernels and bias, randomly in each
    family's initialisation range for AKPs, 1 for gains and 0 for offsets. Use
    :meth:`from_pattern`, :meth:`from_assignment` or :meth:`from_conv` rather than setting them by
    hand.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        assignment: str | Sequence[str],
        gain: bool = False,
        offset: bool = False,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        # nn.Conv2d validates every argument and normalises tuples and string paddings; a meta
        # tensor costs nothing, and we inherit its exact semantics and error messages.
        proto = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device="meta",
        )
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attr, getattr(proto, attr))
        h, w = self.kernel_size
        n_kernels = out_channels * (in_channels // groups)
        codes = _assignment_codes(assignment, n_kernels)
        self.gain_enabled = bool(gain)
        self.offset_enabled = bool(offset)

        # Plain kernels and bias start as nn.Conv2d would start them.
        init = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        if generator is not None:
            # Same distribution as nn.Conv2d's kaiming_uniform(a=sqrt(5)) init, but reproducible.
            with torch.no_grad():
                bound = 1.0 / (in_channels // groups * h * w) ** 0.5
                init.weight.uniform_(-bound, bound, generator=generator)
                if bias:
                    init.bias.uniform_(-bound, bound, generator=generator)
        flat_init = init.weight.detach().reshape(n_kernels, h, w)

        factory = {"device": device, "dtype": flat_init.dtype}
        self.akp = nn.ParameterDict()
        self.gain = nn.ParameterDict()
        self.offset = nn.ParameterDict()
        for code, idx in _group(codes).items():
            index = torch.tensor(idx, dtype=torch.long, device=device)
            self.register_buffer(_index_name(code), index)
            if code == _PLAIN:
                self.plain = nn.Parameter(flat_init[index].clone())
                continue
            fam = kernels.get(code)
            if fam.num_params:
                akps = fam.sample(len(idx), h, w, generator=generator, **factory)
                self.akp[code] = nn.Parameter(fam.to_unconstrained(akps))
            if self.gain_enabled:
                self.gain[code] = nn.Parameter(torch.ones(len(idx), **factory))
            # A Mean kernel with a gain is already any constant, so an offset would be a second
            # parameter for the same thing (SPEC §4); without a gain the offset is its one.
            if self.offset_enabled and (fam.num_params or not self.gain_enabled):
                self.offset[code] = nn.Parameter(torch.zeros(len(idx), **factory))
        if _PLAIN not in codes:
            self.register_parameter("plain", None)
        self.bias = nn.Parameter(init.bias.detach().clone()) if bias else None
        self.register_buffer("_cached_weight", None, persistent=False)
        self._cache_key: tuple = ()
        # Follows .to()/.double() like any buffer, so even a layer without float parameters
        # (all Mean, no gain, no bias) knows its dtype and device.
        self.register_buffer("_anchor", torch.empty(0, **factory), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_cache_hook)

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def from_pattern(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        pattern_text: str,
        **kwargs,
    ) -> ACL:
        """Build a layer from an arrangement pattern (paper Eqs. 9-10), e.g.
        ``ACL.from_pattern(3, 64, 7, "G30Lg15Lt15Tf36P96", padding=3)``. Extra keyword arguments
        are those of the constructor (``stride``, ``gain``, ``generator``...)."""
        return cls(in_channels, out_channels, kernel_size, assignment=pattern_text, **kwargs)

    @classmethod
    def from_assignment(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        codes: Sequence[str],
        akps: Mapping[str, Tensor],
        *,
        gains: Mapping[str, Tensor] | None = None,
        offsets: Mapping[str, Tensor] | None = None,
        plain: Tensor | None = None,
        bias: Tensor | None = None,
        **conv_kwargs,
    ) -> ACL:
        """Build a layer from explicit per-kernel values (what the converter produces).

        Args:
            codes: family code per kernel, length ``Co * Ci/groups``.
            akps: ``code -> (n_code, P)`` AKPs in the paper's units, rows in kernel order.
            gains, offsets: ``code -> (n_code,)``; giving them enables gains / offsets.
            plain: ``(n_plain, h, w)`` plain kernels in kernel order.
            bias: ``(Co,)`` or None for no bias.
        """
        layer = cls(
            in_channels,
            out_channels,
            kernel_size,
            bias=bias is not None,
            assignment=codes,
            gain=bool(gains),
            offset=bool(offsets),
            **conv_kwargs,
        )
        layer.set_values(akps, gains=gains, offsets=offsets, plain=plain, bias=bias)
        return layer

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        codes: Sequence[str],
        akps: Mapping[str, Tensor],
        *,
        gains: Mapping[str, Tensor] | None = None,
        offsets: Mapping[str, Tensor] | None = None,
    ) -> ACL:
        """Replace ``conv`` by an ACL: its hyper-parameters, bias and (for kernels coded ``P``)
        its kernels are kept; the ACKs get the given AKPs, gains and offsets."""
        h, w = conv.kernel_size
        flat = conv.weight.detach().reshape(-1, h, w)
        plain_idx = [k for k, c in enumerate(codes) if c == _PLAIN]
        return cls.from_assignment(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            codes,
            akps,
            gains=gains,
            offsets=offsets,
            plain=flat[plain_idx] if plain_idx else None,
            bias=None if conv.bias is None else conv.bias.detach(),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @torch.no_grad()
    def set_values(
        self,
        akps: Mapping[str, Tensor],
        *,
        gains: Mapping[str, Tensor] | None = None,
        offsets: Mapping[str, Tensor] | None = None,
        plain: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        """Overwrite parameters in place. AKPs are given in the paper's units (not
        unconstrained); every family present must be given."""
        h, w = self.kernel_size
        for code in self.codes_present():
            if code == _PLAIN:
                continue
            n = len(self.index(code))
            if code in self.akp:
                fam = kernels.get(code)
                value = _checked(akps, code, (n, fam.num_params), "akps")
                for k, p in enumerate(fam.params):
                    if p.kind == "positive" and not bool((value[:, k] > 0).all()):
                        raise ValueError(
                            f"akps[{code!r}]: {p.name} must be > 0, got "
                            f"{value[:, k].min().item():g}"
                        )
                self.akp[code].copy_(fam.to_unconstrained(value.to(self.akp[code])))
            if code in self.gain:
                self.gain[code].copy_(_checked(gains, code, (n,), "gains"))
            if code in self.offset:
                self.offset[code].copy_(_checked(offsets, code, (n,), "offsets"))
        if self.plain is not None:
            if plain is None or tuple(plain.shape) != tuple(self.plain.shape):
                got = None if plain is None else tuple(plain.shape)
                raise ValueError(
                    f"plain kernels must have shape {tuple(self.plain.shape)}, got {got}"
                )
            self.plain.copy_(plain)
        if self.bias is not None and bias is not None:
            if tuple(bias.shape) != tuple(self.bias.shape):
                raise ValueError(
                    f"bias must have shape {tuple(self.bias.shape)}, got {tuple(bias.shape)}"
                )
            self.bias.copy_(bias)
        self._cached_weight = None

    # --- what the layer is made of -----------------------------------------------------------

    def index(self, code: str) -> Tensor:
        """Kernel indices ``(n_code,)`` owned by family ``code`` (ascending)."""
        return getattr(self, _index_name(code))

    def codes_present(self) -> list[str]:
        """Family codes present in this layer, in order of first kernel."""
        found = [(self.index(c)[0].item(), c) for c in self._codes_with_buffers()]
        return [c for _, c in sorted(found)]

    def _codes_with_buffers(self) -> list[str]:
        prefix = "index_"
        return [
            name[len(prefix) :]
            for name, _ in self.named_buffers(recurse=False)
            if name.startswith(prefix)
        ]

    @property
    def num_kernels(self) -> int:
        return self.out_channels * (self.in_channels // self.groups)

    @property
    def codes(self) -> list[str]:
        """Family code of every kernel, in kernel order (length ``Co * Ci/groups``)."""
        out = [""] * self.num_kernels
        for code in self._codes_with_buffers():
            for k in self.index(code).tolist():
                out[k] = code
        return out

    @property
    def pattern(self) -> str:
        """Run-length encoded mosaic with the ``(Ci x Co)`` prefix, e.g. ``(3x64)G30P162``."""
        return pattern.format_counts(
            pattern.run_length(self.codes), self.in_channels // self.groups, self.out_channels
        )

    def family_totals(self) -> dict[str, int]:
        """Number of kernels per family code: the paper's families in their usual order, then
        any others, plain last."""
        order = {c: i for i, c in enumerate(kernels.PAPER_FAMILIES)}
        present = sorted(
            self._codes_with_buffers(), key=lambda c: (c == _PLAIN, order.get(c, len(order)), c)
        )
        return {c: len(self.index(c)) for c in present}

    def akps(self, code: str) -> Tensor:
        """AKPs of family ``code`` in the paper's units, ``(n_code, P)`` (differentiable)."""
        fam = kernels.get(code)
        if code not in self.akp:
            return torch.empty(len(self.index(code)), 0, dtype=self._dtype(), device=self._device())
        return fam.from_unconstrained(self.akp[code])

    def compact_factor(self) -> float:
        """Eq. 25 for this layer: 1 - learnable kernel parameters / (Co * Ci/groups * h * w)."""
        h, w = self.kernel_size
        return pattern.compact_factor_counts(
            self.family_totals().items(), h, w, gain=self.gain_enabled, offset=self.offset_enabled
        )

    # --- weight synthesis and forward --------------------------------------------------------

    def synthesize(self) -> Tensor:
        """Build the ``(Co, Ci/groups, h, w)`` weight from the current parameters."""
        h, w = self.kernel_size
        idx, blocks = [], []
        for code in self._codes_with_buffers():
            index = self.index(code)
            if code == _PLAIN:
                block = self.plain
            else:
                # float64 for the ACK values (kernels are tiny, so it costs nothing): a kernel
                # near its flat limit is a large gain times a nearly constant shape plus a large
                # offset, and in float32 that sum cancels.
                fam = kernels.get(code)
                block = fam(self.akps(code).double(), h, w)
                if code in self.gain:
                    block = self.gain[code].double()[:, None, None] * block
                if code in self.offset:
                    block = block + self.offset[code].double()[:, None, None]
                block = block.to(self._dtype())
            idx.append(index)
            blocks.append(block)
        flat = torch.cat(blocks).new_empty(self.num_kernels, h, w)
        flat = flat.index_copy(0, torch.cat(idx), torch.cat(blocks))
        return flat.view(self.out_channels, self.in_channels // self.groups, h, w)

    @property
    def weight(self) -> Tensor:
        """The synthesised ``(Co, Ci/groups, h, w)`` weight.

        In eval mode, when no gradient is needed (``torch.no_grad``/``inference_mode``, or frozen
        parameters), it is cached, so inference costs what a plain convolution costs.
        """
        params = list(self.parameters())
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            # Gradients must reach the AKPs, also when fine-tuning in eval mode (frozen BN).
            return self.synthesize()
        # In-place updates (optimiser steps, load_state_dict, set_values) bump a tensor's
        # version, so a cache made from older values is never used.
        key = tuple((id(p), p._version) for p in params)
        if self._cached_weight is None or key != self._cache_key:
            # Built outside inference mode: a cache made under torch.inference_mode() would be
            # an inference tensor, unusable by a later forward that needs autograd.
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = self.synthesize()
            self._cache_key = key
        return self._cached_weight

    def train(self, mode: bool = True) -> ACL:
        # Parameters may change while training, so the cache lives only in eval mode.
        self._cached_weight = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    # --- conversion and maintenance ----------------------------------------------------------

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the synthesised weight baked in (identical output)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self._device(),
            dtype=self._dtype(),
        )
        with torch.no_grad():
            conv.weight.copy_(self.synthesize())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @torch.no_grad()
    def canonicalize_(self) -> ACL:
        """Fold AKPs (and gain signs) into their canonical ranges in place; the weight is
        unchanged (SPEC §2). Call after training, before reporting."""
        for code in list(self.akp.keys()):
            fam = kernels.get(code)
            gain = self.gain[code] if code in self.gain else None
            akp, new_gain = fam.canonicalize(
                self.akps(code), None if gain is None else gain.clone()
            )
            self.akp[code].copy_(fam.to_unconstrained(akp))
            if gain is not None:
                gain.copy_(new_gain)
        self._cached_weight = None
        return self

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        extras = [
            n for n, on in (("gain", self.gain_enabled), ("offset", self.offset_enabled)) if on
        ]
        if extras:
            s += ", " + "+".join(extras)
        return s + f", pattern={self.pattern}, compact_factor={self.compact_factor():.4f}"

    def _device(self) -> torch.device:
        return self._anchor.device

    def _dtype(self) -> torch.dtype:
        return self._anchor.dtype


def _index_name(code: str) -> str:
    return f"index_{code}"


def _assignment_codes(assignment: str | Sequence[str], n_kernels: int) -> list[str]:
    if isinstance(assignment, str):
        codes = pattern.expand(assignment, n_kernels)
    else:
        codes = list(assignment)
        if len(codes) != n_kernels:
            raise ValueError(
                f"assignment has {len(codes)} codes but the layer has {n_kernels} kernels "
                "(out_channels * in_channels / groups)"
            )
    for code in set(codes):
        kernels.get(code)  # raises KeyError naming the known codes
    return codes


def _group(codes: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for k, code in enumerate(codes):
        groups.setdefault(code, []).append(k)
    return groups


def _checked(values: Mapping[str, Tensor] | None, code: str, shape: tuple, what: str) -> Tensor:
    if values is None or code not in values:
        raise ValueError(f"{what} for family {code!r} are missing")
    value = torch.as_tensor(values[code])
    if tuple(value.shape) != shape:
        raise ValueError(f"{what}[{code!r}] must have shape {shape}, got {tuple(value.shape)}")
    return value


def _drop_cache_hook(module, *_args, **_kwargs) -> None:
    # Loading new parameters in eval mode must not leave a stale cached weight behind.
    module._cached_weight = None
