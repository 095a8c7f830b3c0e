"""What every kernel of one converted conv becomes: the record that carries a layer from the fit
through selection and the joint re-solve into an :class:`~acl_convert.nn.acl.ACL`.

Kernel ``k`` is ``weight.view(-1, h, w)[k]``, ``k = q * (Ci/groups) + p`` for output channel
``q`` and input channel ``p`` (SPEC §3). Per kernel the record holds its family code, its AKPs (in
the paper's units and canonical ranges), gain and offset; plain kernels keep their values. The
one function that turns it into kernel values is :meth:`Assignment.kernels`, built on
:meth:`KernelFamily.synthesize`, which the layer uses too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels, pattern

__all__ = ["Assignment", "PLAIN"]

PLAIN = "P"


@dataclass
class Assignment:
    """The per-kernel assignment of one conv layer.

    Attributes:
        shape: the conv weight's shape ``(Co, Ci/groups, h, w)``.
        codes: family code per kernel, length ``K = Co * Ci/groups`` (``P``: kept plain).
        akps: ``(K, P_max)`` float64 AKPs in the paper's units; a kernel uses the first
            ``num_params`` columns of its family, the rest are 0 (all 0 for plain kernels).
        gain: ``(K,)`` float64 gain of each ACK (0 for plain kernels).
        offset: ``(K,)`` float64 offset of each ACK (0 where the kernel has none).
        plain: ``(K, h, w)`` float64 values of the kernels kept plain (a row of an ACK is
            ignored; it holds the original kernel).
        bias: ``(Co,)`` float64, or None when the conv has none.
        offset_enabled: whether ACKs carry offsets (see :meth:`KernelFamily.carries_offset`).
        gain_enabled: whether ACKs carry gains (always, for converted layers; a layer built
            from a pattern may have none, its ``gain`` is then 1).
        tie: ``(K,)`` long, or None: kernels with the same id ``>= 0`` share one row of AKPs
            (channel-tied ACKs; they must be of one family); ``-1`` is a kernel of its own.
    """

    shape: tuple[int, int, int, int]
    codes: list[str]
    akps: Tensor
    gain: Tensor
    offset: Tensor
    plain: Tensor
    bias: Tensor | None
    offset_enabled: bool
    gain_enabled: bool = True
    tie: Tensor | None = None

    def __post_init__(self) -> None:
        co, cig, h, w = self.shape
        k = co * cig
        if len(self.codes) != k:
            raise ValueError(f"{len(self.codes)} codes for {k} kernels of shape {self.shape}")
        for name, want in (("gain", (k,)), ("offset", (k,)), ("plain", (k, h, w))):
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise ValueError(f"{name} must have shape {want}, got {got}")
        if self.akps.ndim != 2 or self.akps.shape[0] != k:
            raise ValueError(f"akps must have shape ({k}, P), got {tuple(self.akps.shape)}")
        if self.tie is not None and tuple(self.tie.shape) != (k,):
            raise ValueError(f"tie must have shape ({k},), got {tuple(self.tie.shape)}")

    @classmethod
    def all_plain(cls, weight: Tensor, bias: Tensor | None, offset_enabled: bool) -> Assignment:
        """Every kernel of ``weight`` ``(Co, Ci/groups, h, w)`` kept as it is."""
        co, cig, h, w = weight.shape
        k = co * cig
        zeros = torch.zeros(k, dtype=torch.float64)
        return cls(
            shape=(co, cig, h, w),
            codes=[PLAIN] * k,
            akps=torch.zeros(k, 0, dtype=torch.float64),
            gain=zeros,
            offset=zeros.clone(),
            plain=weight.detach().double().reshape(k, h, w).clone(),
            bias=None if bias is None else bias.detach().double().clone(),
            offset_enabled=offset_enabled,
        )

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    def __len__(self) -> int:
        return len(self.codes)

    def replace(self, **changes) -> Assignment:
        """A copy with some fields replaced (the others shared)."""
        return dataclasses.replace(self, **changes)

    def index(self, code: str) -> Tensor:
        """``(n,)`` long: the kernels of family ``code``, ascending."""
        return torch.tensor([k for k, c in enumerate(self.codes) if c == code], dtype=torch.long)

    def present(self) -> list[str]:
        """The family codes used, in order of first kernel."""
        return list(dict.fromkeys(self.codes))

    def has_offset(self) -> Tensor:
        """``(K,)`` bool: which kernels carry an offset parameter."""
        carries = {
            c: kernels.get(c).carries_offset(self.offset_enabled, self.gain_enabled)
            for c in self.present()
        }
        return torch.tensor([carries[c] for c in self.codes], dtype=torch.bool)

    def kernels(self) -> Tensor:
        """The ``(K, h, w)`` float64 kernels this assignment stands for."""
        h, w = self.kernel_size
        out = self.plain.clone()
        for code in self.present():
            if code == PLAIN:
                continue
            idx = self.index(code)
            fam = kernels.get(code)
            out[idx] = fam.synthesize(
                self.akps[idx, : fam.num_params], h, w, self.gain[idx], self.offset[idx]
            )
        return out

    def weight(self) -> Tensor:
        """The ``(Co, Ci/groups, h, w)`` float64 weight."""
        return self.kernels().view(self.shape)

    def family_totals(self) -> dict[str, int]:
        return pattern.totals(self.codes)

    def rows(self, code: str) -> tuple[Tensor, Tensor]:
        """For family ``code``: the AKP row of each of its kernels ``(n,)`` (index order) and,
        per row, its first kernel ``(n_rows,)``. Untied kernels each have a row of their own;
        kernels with one tie id share one, numbered in order of first kernel."""
        idx = self.index(code)
        if self.tie is None:
            ar = torch.arange(len(idx))
            return ar, idx
        ids = self.tie[idx].tolist()
        row_of: dict[int, int] = {}
        rows, first = [], []
        for j, t in enumerate(ids):
            key = t if t >= 0 else -1 - j  # an untied kernel is a tie group of its own
            if key not in row_of:
                row_of[key] = len(first)
                first.append(int(idx[j]))
            rows.append(row_of[key])
        return torch.tensor(rows, dtype=torch.long), torch.tensor(first, dtype=torch.long)

    def parameter_count(self) -> int:
        """Learnable kernel parameters (Eq. 25's numerator): a shared AKP row counts once."""
        h, w = self.kernel_size
        items = []
        for code, n in self.family_totals().items():
            n_rows = n if code == PLAIN else len(self.rows(code)[1])
            items.append((code, n, n_rows))
        return pattern.parameter_count_tied(
            items, h, w, gain=self.gain_enabled, offset=self.offset_enabled
        )
