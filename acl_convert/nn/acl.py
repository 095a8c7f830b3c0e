"""The Analytic Convolutional Layer (ACL): a drop-in ``nn.Conv2d`` whose kernels are a mosaic of
analytic kernels (ACKs) and plain kernels (paper §3.2-3.3).

Kernel ``k`` of the layer is ``weight.view(-1, h, w)[k]``, i.e. ``k = q * (Ci/groups) + p`` for
output channel ``q`` and input channel ``p`` (SPEC §3). Each kernel has a family code. Per family
present, the layer holds one tensor of AKPs (kept unconstrained, see
:meth:`KernelFamily.from_unconstrained`), optionally one of gains and one of offsets
(``kernel = gain * f(AKPs) + offset``, SPEC §2), and an index buffer saying which kernels it owns.
Plain kernels are one ``(n_plain, h, w)`` tensor.

Channel-tied ACKs (paper Fig. 3: an RGB triple as one pattern in three strengths): several kernels
of a family may share one row of AKPs while keeping a gain and an offset each, so
``kernel = gain_k * f(AKPs_row(k)) + offset_k``. A family with shared rows holds an
``akp_row_<code>`` buffer ``(n_code,)`` giving each of its kernels its AKP row; its AKP tensor then
has one row per *row*, not per kernel. Without the buffer row ``j`` is kernel ``j`` (untied), so
untied layers keep exactly the tensors they always had. Typically a row is one output channel
(:func:`channel_rows`), but any kernels of one family may share one.

The synthesised weight is a derived tensor: rebuilt on every call in training mode, cached in
``eval()`` so inference costs what a plain convolution costs, and dropped again by ``train()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels, pattern
from .assignment import Assignment

__all__ = ["ACL", "channel_rows"]

_PLAIN = "P"
#: What an ACL takes over from the ``nn.Conv2d`` that validates its hyper-parameters.
_CONV_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class ACL(nn.Module):
    """Analytic Convolutional Layer.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: exactly as :class:`torch.nn.Conv2d` (validated by it, too).
        assignment: the family code of every kernel: a sequence of ``Co * Ci/groups`` codes
            (kernel order as above), or an arrangement pattern (counts or ratio form, Eqs. 9-10).
        gain: give every ACK a learnable gain (SPEC §2). Off for layers built from a pattern.
        offset: give every ACK (except Mean, which is already constant) a learnable offset.
        akp_rows: ``code -> (n_code,)`` integer AKP row of each kernel of that family (in
            index order), for families whose kernels share AKPs (channel-tied ACKs); rows are
            ``0 .. n_rows-1``, each used at least once. Families not given (or given the
            identity) have one row per kernel. See :func:`channel_rows`.

    Parameters are initialised like ``nn.Conv2d`` for plain kernels and bias, randomly in each
    family's initialisation range for AKPs, 1 for gains and 0 for offsets. Use
    :meth:`from_pattern`, :meth:`from_assignment` or :meth:`from_conv` rather than setting them by
    hand.
    """

    # Python-only conveniences; a scripted layer reads its frozen weight (__prepare_scriptable__).
    __jit_unused_properties__ = ["weight", "num_kernels", "codes", "pattern"]

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
        akp_rows: Mapping[str, Sequence[int] | Tensor] | None = None,
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
        for attr in _CONV_ATTRIBUTES:
            setattr(self, attr, getattr(proto, attr))
        h, w = self.kernel_size
        n_kernels = out_channels * (in_channels // groups)
        codes = _assignment_codes(assignment, n_kernels)
        groups_by_code = _group(codes)
        rows = _checked_rows(akp_rows, {c: len(i) for c, i in groups_by_code.items()})
        self.gain_enabled = bool(gain)
        self.offset_enabled = bool(offset)

        init = _initial_conv(
            in_channels, out_channels, kernel_size, groups, bias, generator, device, dtype
        )
        flat_init = init.weight.detach().reshape(n_kernels, h, w)

        factory = {"device": device, "dtype": flat_init.dtype}
        self.akp = nn.ParameterDict()
        self.gain = nn.ParameterDict()
        self.offset = nn.ParameterDict()
        for code, idx in groups_by_code.items():
            self._register_family(code, idx, rows.get(code), flat_init, generator, factory)
        if _PLAIN not in codes:
            self.register_parameter("plain", None)
        self.bias = nn.Parameter(init.bias.detach().clone()) if bias else None
        self.register_buffer("_cached_weight", None, persistent=False)
        self.register_buffer("_script_weight", torch.empty(0, **factory), persistent=False)
        self._cache_key: tuple = ()
        # Follows .to()/.double() like any buffer, so even a layer without float parameters
        # (all Mean, no gain, no bias) knows its dtype and device.
        self.register_buffer("_anchor", torch.empty(0, **factory), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_cache_hook)

    def _register_family(
        self,
        code: str,
        idx: list[int],
        rows: Tensor | None,
        flat_init: Tensor,
        generator: torch.Generator | None,
        factory: dict,
    ) -> None:
        """Register the tensors of the kernels ``idx`` (kernel order) of family ``code``: their
        index buffer, then either the plain kernels ``(n, h, w)`` taken from ``flat_init``
        ``(Co*Ci/groups, h, w)``, or the AKPs ``(n_rows, P)`` (one row per kernel unless
        ``rows`` ``(n,)`` shares them) and the gains and offsets ``(n,)`` the layer has.
        ``factory`` holds the device and dtype of new tensors."""
        h, w = self.kernel_size
        index = torch.tensor(idx, dtype=torch.long, device=factory["device"])
        self.register_buffer(_index_name(code), index)
        if code == _PLAIN:
            self.plain = nn.Parameter(flat_init[index].clone())
            return
        n_rows = len(idx)
        if rows is not None:
            self.register_buffer(_row_name(code), rows.to(factory["device"]))
            n_rows = int(rows.max()) + 1
        fam = kernels.get(code)
        if fam.num_params:
            akps = fam.sample(n_rows, h, w, generator=generator, **factory)
            self.akp[code] = nn.Parameter(fam.to_unconstrained(akps))
        if self.gain_enabled:
            self.gain[code] = nn.Parameter(torch.ones(len(idx), **factory))
        if fam.carries_offset(self.offset_enabled, self.gain_enabled):
            self.offset[code] = nn.Parameter(torch.zeros(len(idx), **factory))

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
    def from_values(
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
        akp_rows: Mapping[str, Sequence[int] | Tensor] | None = None,
        **conv_kwargs,
    ) -> ACL:
        """Build a layer from explicit per-family values (:meth:`from_assignment` takes the
        converter's per-kernel record instead).

        Args:
            codes: family code per kernel, length ``Co * Ci/groups``.
            akps: ``code -> (n_rows_code, P)`` AKPs in the paper's units: one row per kernel in
                kernel order, or, for a family in ``akp_rows``, one row per AKP row.
            gains, offsets: ``code -> (n_code,)``, one per kernel (tied or not), kernel order;
                giving them enables gains / offsets.
            plain: ``(n_plain, h, w)`` plain kernels in kernel order.
            bias: ``(Co,)`` or None for no bias.
            akp_rows: ``code -> (n_code,)`` AKP row of each kernel of the family, for tied
                families (see the class and :func:`channel_rows`).
        """
        layer = cls(
            in_channels,
            out_channels,
            kernel_size,
            bias=bias is not None,
            assignment=codes,
            gain=bool(gains),
            offset=bool(offsets),
            akp_rows=akp_rows,
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
        akp_rows: Mapping[str, Sequence[int] | Tensor] | None = None,
    ) -> ACL:
        """Replace ``conv`` by an ACL: its hyper-parameters, bias and (for kernels coded ``P``)
        its kernels are kept; the ACKs get the given AKPs, gains and offsets (arguments as in
        :meth:`from_assignment`)."""
        h, w = conv.kernel_size
        flat = conv.weight.detach().reshape(-1, h, w)
        plain_idx = [k for k, c in enumerate(codes) if c == _PLAIN]
        return cls.from_values(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            codes,
            akps,
            gains=gains,
            offsets=offsets,
            plain=flat[plain_idx] if plain_idx else None,
            bias=None if conv.bias is None else conv.bias.detach(),
            akp_rows=akp_rows,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_assignment(cls, assignment: Assignment, **conv_kwargs) -> ACL:
        """The layer an :class:`~acl_convert.nn.assignment.Assignment` describes: its ACKs with
        their AKPs, gains and offsets (kernels with one ``tie`` id share an AKP row), its plain
        kernels and bias. ``conv_kwargs`` are the conv's other hyper-parameters (``stride``,
        ``padding``, ``groups``, ``dtype``...); ``in_channels`` is ``Ci/groups * groups``."""
        co, cig, h, w = assignment.shape
        akps, gains, offsets, rows = {}, {}, {}, {}
        for code in assignment.present():
            if code == _PLAIN:
                continue
            fam = kernels.get(code)
            idx = assignment.index(code)
            row_of, first = assignment.rows(code)
            akps[code] = assignment.akps[first, : fam.num_params]
            if assignment.gain_enabled:
                gains[code] = assignment.gain[idx]
            if fam.carries_offset(assignment.offset_enabled, assignment.gain_enabled):
                offsets[code] = assignment.offset[idx]
            if len(first) < len(idx):
                rows[code] = row_of
        plain_idx = assignment.index(_PLAIN)
        return cls.from_values(
            cig * conv_kwargs.get("groups", 1),
            co,
            (h, w),
            assignment.codes,
            akps,
            gains=gains or None,
            offsets=offsets or None,
            plain=assignment.plain[plain_idx] if len(plain_idx) else None,
            bias=assignment.bias,
            akp_rows=rows or None,
            **conv_kwargs,
        )

    @torch.no_grad()
    def assignment(self) -> Assignment:
        """The layer's current values as an :class:`~acl_convert.nn.assignment.Assignment`
        (AKPs in the paper's units; kernels sharing an AKP row get one ``tie`` id)."""
        h, w = self.kernel_size
        k_total = self.num_kernels
        codes = self.codes
        p_max = max([kernels.get(c).num_params or 0 for c in set(codes)] + [0])
        akps = torch.zeros(k_total, p_max, dtype=torch.float64)
        gain = torch.zeros(k_total, dtype=torch.float64)
        offset = torch.zeros(k_total, dtype=torch.float64)
        tie = torch.full((k_total,), -1, dtype=torch.long)
        next_tie = 0
        for code in self.codes_present():
            if code == _PLAIN:
                continue
            idx = self.index(code).cpu()
            n_akp = kernels.get(code).num_params
            akps[idx, :n_akp] = self.kernel_akps(code).detach().double().cpu()
            gain[idx] = self.gain[code].double().cpu() if code in self.gain else 1.0
            if code in self.offset:
                offset[idx] = self.offset[code].double().cpu()
            if self.is_tied(code):
                rows = self.akp_rows(code).cpu()
                shared = torch.bincount(rows)[rows] > 1
                tie[idx[shared]] = rows[shared] + next_tie
                next_tie += self.num_rows(code)
        plain = self.synthesize().detach().double().cpu().reshape(k_total, h, w)
        return Assignment(
            shape=(self.out_channels, self.in_channels // self.groups, h, w),
            codes=codes,
            akps=akps,
            gain=gain,
            offset=offset,
            plain=plain,
            bias=None if self.bias is None else self.bias.detach().double().cpu(),
            offset_enabled=self.offset_enabled,
            gain_enabled=self.gain_enabled,
            tie=tie if next_tie else None,
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
        unconstrained), ``(n_rows_code, P)`` (see :meth:`num_rows`); gains and offsets
        ``(n_code,)``; every family present must be given."""
        for code in self.codes_present():
            if code == _PLAIN:
                continue
            n = len(self.index(code))
            if code in self.akp:
                fam = kernels.get(code)
                value = _checked(akps, code, (self.num_rows(code), fam.num_params), "akps")
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
        prefix = f"({self.in_channels // self.groups}x{self.out_channels})"
        # Written out directly: the runs of a layer are valid by construction, and checking
        # each of a 512x512 layer's runs (pattern.format_counts) took longer than the layer.
        return prefix + "".join(f"{c}{n}" for c, n in pattern.run_length(self.codes))

    def family_totals(self) -> dict[str, int]:
        """Number of kernels per family code: the paper's families in their usual order, then
        any others, plain last."""
        order = {c: i for i, c in enumerate(kernels.PAPER_FAMILIES)}
        present = sorted(
            self._codes_with_buffers(), key=lambda c: (c == _PLAIN, order.get(c, len(order)), c)
        )
        return {c: len(self.index(c)) for c in present}

    def akp_rows(self, code: str) -> Tensor:
        """AKP row of each kernel of family ``code``, ``(n_code,)`` long, in index order; the
        identity ``0 .. n_code-1`` when the family is untied."""
        name = _row_name(code)
        if name in self._buffers:
            return self._buffers[name]
        index = self.index(code)
        return torch.arange(len(index), device=index.device)

    def num_rows(self, code: str) -> int:
        """Number of AKP rows of family ``code``: ``n_code`` untied, fewer when rows are shared."""
        if code in self.akp:
            return len(self.akp[code])
        name = _row_name(code)
        if name in self._buffers:  # a family without AKPs (Mean): its rows are all alike
            return int(self._buffers[name].max()) + 1
        return len(self.index(code))

    def is_tied(self, code: str | None = None) -> bool:
        """Whether family ``code`` (default: any family of the layer) has an AKP row shared by
        two or more kernels."""
        codes = [code] if code is not None else self._codes_with_buffers()
        return any(self.num_rows(c) < len(self.index(c)) for c in codes if c != _PLAIN)

    def tied_kernels(self, code: str) -> Tensor:
        """``(n_code,)`` bool, index order: whether each kernel of ``code`` shares its AKP row
        with another kernel."""
        rows = self.akp_rows(code)
        return torch.bincount(rows, minlength=self.num_rows(code))[rows] > 1

    def akps(self, code: str) -> Tensor:
        """AKPs of family ``code`` in the paper's units, one per AKP row: ``(n_rows_code, P)``,
        which is ``(n_code, P)`` for an untied family (differentiable). Per kernel:
        :meth:`kernel_akps`."""
        fam = kernels.get(code)
        if code not in self.akp:
            return torch.empty(self.num_rows(code), 0, dtype=self._dtype(), device=self._device())
        return fam.from_unconstrained(self.akp[code])

    def kernel_akps(self, code: str) -> Tensor:
        """AKPs of every kernel of family ``code`` in the paper's units, ``(n_code, P)`` in
        index order; kernels sharing a row get the same values (differentiable)."""
        return self.akps(code)[self.akp_rows(code)]

    def compact_factor(self) -> float:
        """Eq. 25 for this layer: 1 - learnable kernel parameters / (Co * Ci/groups * h * w); a
        shared AKP row counts its AKPs once (gains and offsets stay one per kernel)."""
        h, w = self.kernel_size
        items = [
            (c, n, n if c == _PLAIN else self.num_rows(c)) for c, n in self.family_totals().items()
        ]
        return pattern.compact_factor_tied(
            items, h, w, gain=self.gain_enabled, offset=self.offset_enabled
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
                # One AKP set per kernel: the gather sums the gradients of the kernels sharing
                # a row into that row.
                block = kernels.get(code).synthesize(
                    self.akps(code)[self.akp_rows(code)],
                    h,
                    w,
                    self.gain[code] if code in self.gain else None,
                    self.offset[code] if code in self.offset else None,
                )
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
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # A tracer records what runs: the synthesis, every time (a cache hit on the second
            # of torch.jit.trace's two runs would record another graph).
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

    def __prepare_scriptable__(self) -> ACL:
        """Before ``torch.jit.script``: the synthesised weight, frozen in a buffer that the
        scripted ``forward`` uses. TorchScript cannot compile the synthesis (a per-family loop
        over a ``ParameterDict``), and a scripted model is for deployment, where the weight is
        fixed: fine-tune before scripting. The layer itself is not replaced."""
        with torch.no_grad():
            self._script_weight = self.synthesize().detach().clone()
        return self

    def train(self, mode: bool = True) -> ACL:
        # Parameters may change while training, so the cache lives only in eval mode; calling
        # eval() again (every calibration pass does) keeps it.
        if mode:
            self._cached_weight = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            weight = self._script_weight  # see __prepare_scriptable__
        else:
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
        unchanged (SPEC §2). Call after training, before reporting.

        A shared AKP row is folded once, by the gain of largest magnitude among its kernels;
        whatever sign that fold gives its gain, every gain of the row gets too, so each kernel
        ``g f + b`` is unchanged."""
        for code in list(self.akp.keys()):
            fam = kernels.get(code)
            gain = self.gain[code] if code in self.gain else None
            if gain is None:
                akp, _ = fam.canonicalize(self.akps(code), None)
                self._set_folded(code, akp)
                continue
            rows = self.akp_rows(code)
            rep = _representatives(gain.abs(), rows, self.num_rows(code))
            akp, new_rep = fam.canonicalize(self.akps(code), gain[rep].clone())
            # The fold only flips a gain's sign, so the ratio is exactly +-1; an all-zero row's
            # gains stay zero whatever the fold did.
            old_rep = gain[rep]
            factor = torch.where(old_rep != 0, new_rep / old_rep, torch.ones_like(old_rep))
            self._set_folded(code, akp)
            gain.mul_(factor[rows])
        self._cached_weight = None
        return self

    def _set_folded(self, code: str, akp: Tensor) -> None:
        """Store folded AKPs. A fold only moves angles (and real values): positive AKPs keep their
        stored logarithm bit for bit, since ``log(exp(u))`` in float32 is not always ``u``, and
        a kernel near its flat limit (a large gain) magnifies such an ulp."""
        new = self.akp[code].clone()
        for k, p in enumerate(kernels.get(code).params):
            if p.kind != "positive":
                new[..., k] = akp[..., k]
        self.akp[code].copy_(new)

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
        shared = {
            c: int((torch.bincount(self.akp_rows(c)) > 1).sum())
            for c in self.family_totals()
            if c != _PLAIN and self.is_tied(c)
        }
        if shared:
            s += ", tied=" + "".join(f"{c}{n}" for c, n in shared.items())
        # Family totals: the run-length pattern of a big layer runs to kilobytes (``.pattern``).
        totals = " ".join(f"{c}{n}" for c, n in self.family_totals().items())
        return s + f", families={totals}, compact_factor={self.compact_factor():.4f}"

    def _device(self) -> torch.device:
        return self._anchor.device

    def _dtype(self) -> torch.dtype:
        return self._anchor.dtype


def _initial_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    groups: int,
    bias: bool,
    generator: torch.Generator | None,
    device,
    dtype,
) -> nn.Conv2d:
    """A ``nn.Conv2d`` with weight ``(Co, Ci/groups, h, w)`` and bias ``(Co,)`` (if ``bias``)
    initialised as ``nn.Conv2d`` initialises them, drawn from ``generator`` when one is given:
    where an ACL's plain kernels and bias start."""
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
            h, w = init.kernel_size
            bound = 1.0 / (in_channels // groups * h * w) ** 0.5
            init.weight.uniform_(-bound, bound, generator=generator)
            if bias:
                init.bias.uniform_(-bound, bound, generator=generator)
    return init


def _index_name(code: str) -> str:
    return f"index_{code}"


def _row_name(code: str) -> str:
    return f"akp_row_{code}"


def channel_rows(
    codes: Sequence[str], kernels_per_channel: int, tied: Iterable[int]
) -> dict[str, Tensor]:
    """The ``akp_rows`` argument of :class:`ACL` for tying whole output channels.

    Args:
        codes: family code of every kernel, length ``Co * kernels_per_channel``, kernel order.
        kernels_per_channel: ``Ci/groups``.
        tied: the output channels whose kernels share one AKP row; all kernels of such a
            channel must be of one analytic family.

    Returns:
        ``code -> (n_code,)`` long for each family with a tied channel. Rows are numbered in
        order of their first kernel: going through the family's kernels in kernel order, an
        untied kernel opens a row of its own, the first kernel of a tied channel opens the
        channel's row. So the ``akps[code]`` to give with it are, in kernel order, each untied
        kernel's AKPs and each tied channel's AKPs once.

    >>> channel_rows(["G"] * 6 + ["Lg"] * 3, 3, [0])
    {'G': tensor([0, 0, 0, 1, 2, 3])}
    """
    cig = kernels_per_channel
    if cig < 1 or len(codes) % cig:
        raise ValueError(f"{len(codes)} codes are not whole output channels of {cig} kernels each")
    tied = sorted(set(int(q) for q in tied))
    co = len(codes) // cig
    for q in tied:
        if not 0 <= q < co:
            raise ValueError(f"tied output channel {q} is outside 0 .. {co - 1}")
        fams = set(codes[q * cig : (q + 1) * cig])
        if len(fams) != 1 or kernels.get(next(iter(fams))).plain:
            raise ValueError(
                f"output channel {q} has families {sorted(fams)}; a tied channel needs all its "
                "kernels in one analytic family"
            )
    tied_set = set(tied)
    rows: dict[str, list[int]] = {codes[q * cig]: [] for q in tied}
    count = dict.fromkeys(rows, 0)
    for k, code in enumerate(codes):
        if code not in rows:
            continue
        q, p = divmod(k, cig)
        if q in tied_set and p > 0:
            rows[code].append(rows[code][-1])  # the channel's kernels are consecutive
            continue
        rows[code].append(count[code])
        count[code] += 1
    return {c: torch.tensor(r, dtype=torch.long) for c, r in rows.items()}


def _checked_rows(
    akp_rows: Mapping[str, Sequence[int] | Tensor] | None, sizes: Mapping[str, int]
) -> dict[str, Tensor]:
    """Validate ``akp_rows`` against the kernels per family; the identity is dropped (an untied
    family has no row buffer)."""
    out: dict[str, Tensor] = {}
    for code, value in (akp_rows or {}).items():
        if code not in sizes:
            raise ValueError(f"akp_rows[{code!r}]: the layer has no kernel of family {code!r}")
        if code == _PLAIN or kernels.get(code).plain:
            raise ValueError(f"akp_rows[{code!r}]: plain kernels have no AKPs to share")
        rows = torch.as_tensor(value).detach().cpu()
        if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.ndim != 1:
            raise ValueError(
                f"akp_rows[{code!r}] must be a 1-D integer tensor, got {rows.dtype} of shape "
                f"{tuple(rows.shape)}"
            )
        if len(rows) != sizes[code]:
            raise ValueError(
                f"akp_rows[{code!r}] must have one row per kernel of the family, "
                f"{sizes[code]}, got {len(rows)}"
            )
        rows = rows.long()
        if int(rows.min()) < 0:
            raise ValueError(f"akp_rows[{code!r}] has a negative row {int(rows.min())}")
        unused = (torch.bincount(rows) == 0).nonzero().flatten().tolist()
        if unused:
            raise ValueError(
                f"akp_rows[{code!r}]: rows {unused[:5]} are used by no kernel; number rows "
                "0 .. n_rows-1 without gaps"
            )
        if not torch.equal(rows, torch.arange(len(rows))):
            out[code] = rows
    return out


def _representatives(magnitude: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``(n_rows,)``: per row, the position (in ``rows``) of its first kernel of largest
    ``magnitude``."""
    best = magnitude.new_zeros(n_rows).scatter_reduce(
        0, rows, magnitude, "amax", include_self=False
    )
    position = torch.arange(len(rows), device=rows.device)
    candidate = torch.where(magnitude == best[rows], position, len(rows))
    return candidate.new_full((n_rows,), len(rows)).scatter_reduce(
        0, rows, candidate, "amin", include_self=True
    )


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
