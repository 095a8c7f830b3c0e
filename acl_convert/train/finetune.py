"""Fine-tuning an AnaNN: which parameters train, the objectives, and a resumable training loop.

Three objectives (``objective=``):

``logits``
    Distillation: KL divergence between the teacher's and the student's softened class
    distributions (temperature ``T``, scaled by ``T^2`` as usual). Needs a teacher (the original
    network), so unlabelled images suffice.
``layers``
    Distillation of each converted layer alone: the teacher's input to that layer is fed to the
    student's ACL and its output is pulled towards the teacher conv's output (relative squared
    error, averaged over layers). Only the teacher runs forward in full and nothing back-propagates
    through the network, so this is several times cheaper; only ACL parameters learn.
``labels``
    Supervised cross-entropy against the images' labels.

Parameter groups (``train=``): ``akp`` (the AKPs, gains and offsets of every ACL), ``plain`` (the
ACLs' plain kernels) and ``rest`` (everything else: other layers, biases, batch norm). Each has
its own learning rate; groups not trained are frozen (``requires_grad=False``).

Each epoch ends with an atomic save of the AnaNN (AKPs canonicalised, header extended with the
fine-tuning record) and of a training-state file next to it (raw parameters, optimiser state,
epoch, losses), which ``resume=True`` continues from.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..errors import UsageError, UserError
from ..fit import lm
from ..io.anann import save_anann
from ..io.header import AnaNNHeader
from ..io.outputs import write_atomic
from ..nn.acl import ACL

__all__ = [
    "GROUPS",
    "OBJECTIVES",
    "FinetuneConfig",
    "acl_layers",
    "param_groups",
    "state_path",
    "require_state",
    "finetune",
]

GROUPS = ("akp", "plain", "rest")
OBJECTIVES = ("logits", "layers", "labels")
_FORMAT = "acl-convert/finetune-state"


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (recorded in the AnaNN header and the state file).

    Attributes:
        objective: one of :data:`OBJECTIVES`.
        train: the parameter groups that learn, a subset of :data:`GROUPS`.
        lr: relative learning rate per group (Adam, see :func:`param_groups`): about the
            fraction by which one step changes a value. AKPs (log-scales, radians) at the default
            3e-4: on SqueezeNet conv1 1e-3 distils faster, on MobileNetV2's 18 converted
            layers it makes the network worse.
        epochs: passes over the data.
        batch_size: images per step.
        temperature: softening of the ``logits`` objective.
        seed: seeds the shuffling of the images (and nothing else: the model is deterministic).
    """

    objective: str = "logits"
    train: tuple[str, ...] = ("akp",)
    lr: dict[str, float] = field(default_factory=lambda: {"akp": 3e-4, "plain": 1e-3, "rest": 1e-4})
    epochs: int = 1
    batch_size: int = 32
    temperature: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`UsageError` for a value that cannot work."""
        if self.objective not in OBJECTIVES:
            raise UsageError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        bad = [g for g in self.train if g not in GROUPS]
        if bad or not self.train:
            raise UsageError(
                f"parameters to train must be a non-empty subset of {', '.join(GROUPS)}, "
                f"got {','.join(self.train) or 'nothing'}"
            )
        if self.objective == "layers" and set(self.train) - {"akp", "plain"}:
            raise UsageError(
                "the 'layers' objective trains only the ACLs (akp, plain); use 'logits' to "
                "train the rest of the network too"
            )
        for name, value in self.lr.items():
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"learning rate of {name} must be a number > 0, got {value}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch size must be >= 1")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")


def acl_layers(model: nn.Module) -> dict[str, ACL]:
    """The ACL layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ACL)}


def _group_of(name: str, acls: Sequence[str]) -> str:
    for layer in acls:
        prefix = layer + "." if layer else ""
        if name.startswith(prefix):
            local = name[len(prefix) :]
            if local.split(".", 1)[0] in ("akp", "gain", "offset"):
                return "akp"
            if local == "plain":
                return "plain"
    return "rest"


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Optimiser groups for ``model``: one per trained parameter tensor, parameters of the groups
    not trained are frozen. Each group dict has ``name`` (of :data:`GROUPS`), ``param`` (its
    state-dict name), ``params`` and ``lr``.

    Learning rates are relative. Adam moves every value by about ``lr`` per step whatever its
    size, so a tensor's ``lr`` is the group's rate times the tensor's RMS (for gains and
    offsets: the RMS of the layer's kernels), and a step changes a kernel by about ``lr`` of its
    typical size. (With absolute rates, five distillation steps cost MobileNetV2, whose
    depthwise kernels are ~0.01 in size, 15 top-1 points.) AKPs are log-scales and radians:
    they take the rate as it is.
    """
    layers = acl_layers(model)
    if not layers:
        raise UserError("the model has no ACL layers; fine-tune an AnaNN made by acl-convert")
    acls = list(layers)
    # Gains and offsets move on the scale of the layer's kernels, not their own: a near-flat
    # Gabor pairs a huge gain with a huge offset of opposite sign, and a 0.1 % step of either
    # changes its kernel by far more than 0.1 %.
    kernel_rms = {name: _rms(acl.synthesize().detach()) for name, acl in layers.items()}
    groups = []
    for name, p in model.named_parameters():
        group = _group_of(name, acls)
        p.requires_grad_(group in config.train)
        if group not in config.train:
            continue
        if group == "akp" and ".akp." in f".{name}":
            scale = 1.0
        elif group == "akp":  # a gain or an offset of layer <head>
            head = f".{name}".rpartition(".gain." if ".gain." in f".{name}" else ".offset.")[0]
            scale = kernel_rms[head[1:]]
        else:
            scale = _rms(p.detach())
        # An all-zero tensor (a fresh bias) gets the group's rate as it is.
        scale = scale if scale > 0 else 1.0
        groups.append({"name": group, "param": name, "params": [p], "lr": config.lr[group] * scale})
    if not groups:
        raise UserError(
            f"nothing to train: the model has no parameters in {', '.join(config.train)}"
        )
    return groups


def _rms(t: Tensor) -> float:
    return float(t.double().square().mean().sqrt()) if t.numel() else 0.0


def state_path(anann_path: str | Path) -> Path:
    """Where the training state of the AnaNN ``anann_path`` is kept (``<name>.state.pt``)."""
    p = Path(anann_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".state.pt")


def _capture_io(model: nn.Module, names: Sequence[str]):
    store: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name in names:

        def hook(_m, inp, out, name=name):
            # Copies: an in-place ReLU after the conv would overwrite its output.
            store[name] = (inp[0].detach(), out.detach().clone())

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return store, handles


def _loss(
    config: FinetuneConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    acls: dict[str, ACL],
    x: Tensor,
    y: Tensor | None,
) -> Tensor:
    if config.objective == "labels":
        if y is None:
            raise UserError("the 'labels' objective needs labelled images; give labels")
        return F.cross_entropy(student(x), y)
    assert teacher is not None  # checked by finetune()
    if config.objective == "logits":
        with torch.no_grad():
            zt = teacher(x)
        t = config.temperature
        return F.kl_div(
            F.log_softmax(student(x) / t, 1),
            F.log_softmax(zt / t, 1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
    store, handles = _capture_io(teacher, list(acls))
    try:
        with torch.no_grad():
            teacher(x)
    finally:
        for h in handles:
            h.remove()
    losses = []
    for name, acl in acls.items():
        inp, target = store[name]
        diff = acl(inp) - target
        losses.append(diff.square().sum() / target.square().sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def _shuffled(items: list, seed: int, epoch: int) -> list:
    order = list(items)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def finetune(
    student: nn.Module,
    samples: Sequence[Any],
    load: Callable[[Sequence[Any]], tuple[Tensor, Tensor | None]],
    config: FinetuneConfig,
    *,
    output: str | Path,
    header: AnaNNHeader,
    teacher: nn.Module | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Fine-tune ``student`` (a model with ACL layers) and save it after every epoch.

    Args:
        student: the AnaNN module (e.g. from :func:`acl_convert.load_anann`); trained in place.
        samples: the training items (e.g. image paths, or ``(path, label)`` pairs); shuffled per
            epoch with ``config.seed``.
        load: turns a batch of items into ``(images (B, 3, H, W), labels (B,) or None)``.
        config: see :class:`FinetuneConfig`.
        output: the AnaNN file written after each epoch (atomically); its training state goes to
            :func:`state_path` ``(output)``.
        header: the AnaNN header of the input (kept, with a ``finetune`` record added).
        teacher: the original network, required by the ``logits`` and ``layers`` objectives.
        resume: continue from the state file of ``output`` (same settings) instead of starting.
        device: where to train.
        progress: called as ``progress(epoch, images_done, loss)`` after every step.

    Returns:
        The mean training loss of every epoch run so far (resumed epochs included).
    """
    config.check()
    if config.objective != "labels" and teacher is None:
        raise UsageError(
            f"the '{config.objective}' objective distils from the original network; "
            "give the teacher (--teacher ORIGINAL) or use --objective labels"
        )
    if not samples:
        raise UserError("no training images; give a folder with images")
    device = torch.device(device)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    acls = acl_layers(student)
    groups = param_groups(student, config)
    optimizer = torch.optim.Adam(groups)
    hooks = _hold_jumpy_angles(acls)
    damp = _akp_damping(acls) if "akp" in config.train else []
    epoch0, losses = 0, []
    spath = state_path(output)
    if resume:
        epoch0, losses = _restore(spath, student, optimizer, config)
    for epoch in range(epoch0, config.epochs):
        # BatchNorm statistics stay those of the pretrained network: fine-tuning runs on far
        # fewer images than they were estimated on.
        student.eval()
        for acl in acls.values():
            acl.train()  # no cached weight while its parameters change
        total, seen = 0.0, 0
        order = _shuffled(list(samples), config.seed, epoch)
        for start in range(0, len(order), config.batch_size):
            x, y = load(order[start : start + config.batch_size])
            x = x.to(device)
            y = None if y is None else y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(config, student, teacher, acls, x, y)
            if not torch.isfinite(loss):
                raise UserError(
                    f"the loss became {float(loss)} in epoch {epoch + 1}; lower the learning "
                    "rates (--lr-akp, --lr-plain, --lr-rest)"
                )
            loss.backward()
            before = [p.detach().clone() for p, _ in damp]
            optimizer.step()
            with torch.no_grad():
                for (p, scale), old in zip(damp, before, strict=True):
                    p.copy_(old + (p - old) * scale)
            total += loss.item() * len(x)
            seen += len(x)
            if progress is not None:
                progress(epoch, seen, loss.item())
        losses.append(total / max(seen, 1))
        _save(output, spath, student, optimizer, config, header, epoch + 1, losses)
    for h in hooks:
        h.remove()
    student.eval()
    return losses


def _akp_damping(acls: dict[str, ACL]) -> list[tuple[nn.Parameter, Tensor]]:
    """Factors ``(n_rows, P)`` that shrink each Adam step of each AKP of each AKP row, so that a
    step changes every kernel (or tied channel) by about the same fraction of its size.

    Adam moves every AKP by about its learning rate, but what that does to the kernel
    ``g f + b`` is ``|g| |df/du|`` per unit step, which the fit can make far larger than the
    kernel: a Gabor whose carrier nearly vanishes on the pixel grid (wavelength 2 px at phase
    pi/2) needs a gain in the thousands for a kernel of size one. The factor is
    ``min(1, |g f + b| / (|g| |df/du_j|))`` per kernel and AKP ``j``, from the fitted values.
    A row shared by a tied channel moves all its kernels at once, so there both norms are taken
    over the channel's kernels together (root-sum-square over the row).
    Measured on MobileNetV2's 3x3 kernels: without it, three distillation steps of the Gabor AKPs
    (one kernel changed by 18x its size) raised the logits' relative error from 0.17 to 0.47."""
    out = []
    for acl in acls.values():
        h, w = acl.kernel_size
        for code, param in acl.akp.items():
            if not param.requires_grad or code not in acl.gain:
                continue
            fam = kernels.get(code)
            with torch.no_grad():
                u = param.detach().double()
                f, jac = lm.with_jacobian(fam, u, h, w)  # (n_rows, hw), (n_rows, hw, P)
                rows = acl.akp_rows(code)  # (n,)
                gain = acl.gain[code].detach().double()
                kernel = gain[:, None] * f[rows]
                if code in acl.offset:
                    kernel = kernel + acl.offset[code].detach().double()[:, None]
                size2 = u.new_zeros(len(u)).index_add(0, rows, kernel.square().sum(1))
                sens2 = torch.zeros_like(u).index_add(
                    0, rows, gain.square()[:, None] * jac.square().sum(1)[rows]
                )
                size, sensitivity = size2.sqrt()[:, None], sens2.sqrt()  # (n_rows, 1), (.., P)
                scale = (size / sensitivity.clamp_min(1e-30)).clamp(max=1.0)
            out.append((param, scale.to(param.dtype)))
    return out


def _hold_jumpy_angles(acls: dict[str, ACL]) -> list:
    """Zero the gradient of the angles of non-smooth families (TGD1st's theta), so Adam never
    moves them. Their kernel jumps when the orientation axis crosses a pixel: the fit put many
    of them exactly on an axis, where the dead band zeroes a row of pixels, and any step off it
    (1e-3 rad is enough) brings that row back at full strength. Their gradient only sees the
    envelope, so it cannot know."""
    handles = []
    for acl in acls.values():
        for code, param in acl.akp.items():
            fam = kernels.get(code)
            if fam.smooth:
                continue
            mask = torch.tensor(
                [0.0 if p.kind == "angle" else 1.0 for p in fam.params],
                dtype=param.dtype,
                device=param.device,
            )
            if param.requires_grad:
                handles.append(param.register_hook(lambda g, mask=mask: g * mask))
    return handles


def _save(
    output: str | Path,
    spath: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    header: AnaNNHeader,
    epochs_done: int,
    losses: list[float],
) -> None:
    record = {**asdict(config), "epochs_done": epochs_done, "losses": losses}
    state = {
        "format": _FORMAT,
        "config": asdict(config),
        "epoch": epochs_done,
        "losses": losses,
        "model": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    # The state first: an AnaNN without its state could not be resumed, a stale state file
    # next to a complete AnaNN is only one epoch behind.
    write_atomic(spath, lambda tmp: _torch_save(state, tmp))
    # The saved AnaNN has canonical AKPs (SPEC §2); the training copy keeps its raw values so
    # that the optimiser's moments still match them when resuming.
    saved = copy.deepcopy(student).cpu()
    for acl in acl_layers(saved).values():
        acl.canonicalize_()
    save_anann(output, saved.state_dict(), header.with_extra("finetune", record))


def _torch_save(obj: Any, path: Path) -> None:
    # Through a file object: torch names the archive after a path, i.e. the temporary name.
    with open(path, "wb") as f:
        torch.save(obj, f)


def require_state(spath: Path) -> None:
    """Raise :class:`UserError` unless the training state ``spath`` exists (to resume from)."""
    if not spath.is_file():
        raise UserError(
            f"cannot resume: no training state {spath} (it is written after each epoch); "
            "run without --resume to start"
        )


def _restore(
    spath: Path, student: nn.Module, optimizer: torch.optim.Optimizer, config: FinetuneConfig
) -> tuple[int, list[float]]:
    require_state(spath)
    try:
        state = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: the same advice
        raise UserError(
            f"cannot resume: {spath} is unreadable ({type(exc).__name__}); run without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise UserError(f"cannot resume: {spath} is not an acl-convert training state")
    try:
        saved = state["config"]
        for key in ("objective", "train", "batch_size", "seed"):
            if _plain(saved[key]) != _plain(getattr(config, key)):
                raise UsageError(
                    f"cannot resume: the run was started with {key}={saved[key]}, now "
                    f"{getattr(config, key)}; use the same settings or start anew"
                )
        epoch, losses = int(state["epoch"]), [float(v) for v in state["losses"]]
        student.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # A state of another model or run, or a damaged one: nothing in it can be trusted.
        what = type(exc).__name__ + (f" {exc.args[0]!r}" if isinstance(exc, KeyError) else "")
        raise UserError(
            f"cannot resume: {spath} does not belong to this AnaNN and settings ({what}); "
            "start anew without --resume (with --force to replace its files)"
        ) from None
    return epoch, losses


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
