"""Cooperative learning: K segmentation networks trained together, sharing feature maps.

A :class:`CooperativeNet` holds its members -- the very classes ``create_model`` builds
for single use -- and a list of :class:`Link` s. A link names one receiving tap and one
or more sending taps (``"member.tap"``). At the receiving tap the member continues
with its own map concatenated with the senders' maps (bilinearly resized to its size);
the consuming layer was built that many channels wider (``extra_channels``), which is
all a member knows about cooperation.

Execution: the members' ``forward_taps`` generators are advanced in lockstep. A member
waits at a receiving tap until every sender has produced its map, so two-way (cross)
links work, and a one-way pair simply runs the sender ahead. The schedule is checked
once at construction; a link graph that would deadlock is refused with the taps named.

Decisions where the papers are silent (docs/cooperative.md lists each reading):

* Gradients flow through links into the sender by default (the papers train both
  networks end to end with the summed loss); ``detach=True`` per link or globally cuts
  the path so the sender learns only from its own loss.
* Which layers the presets link is declared per architecture (``TapInfo.role``); the
  one-way and cross presets link the same layer set and differ only in direction.
* Multiple-layer links aggregate the senders' maps with a 1x1 conv + BN + ReLU to the
  receiving tap's own width (``multiple_aggregate="project"``, the default), so the
  receiver is exactly twice as wide, as §3.1 says of its links ("two time larger");
  it is computed as per-sender 1x1 convs at each sender's own resolution, resized and
  summed (equal to concat-then-1x1, because resizing and a 1x1 conv commute, and much
  cheaper when deep maps are upsampled). ``"concat"`` resizes and concatenates them
  as they are (DeepLabv3+ on lite0: 1,072 received channels beside the receiver's 64).
* A member section may carry ``init_seed``: the member is then built under its own
  seed and starts like a single network of that seed wherever its shapes allow
  (:func:`build_member`); without it, members draw from the global RNG in turn.
* ``link_init="zero"`` (with every member's ``init_seed``): each layer a link widens
  starts as the same layer of the member alone, with zero weights on the received
  channels, so a linked pair computes exactly what its ensemble computes at step 0 and a
  paired comparison measures what the links learn, not the widened layers' draw
  (:func:`start_links_at_zero`). Default ``"random"``: widened layers keep their own init.
* Taps carry a stream ``group`` (DANet: ``position``/``channel``); a link never joins
  taps of two different groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hub_mixin import HubMixin
from .taps import TapInfo, TapStream, run_taps

PRESETS = (
    "single",
    "ensemble",
    "oneway-same",
    "oneway-multiple",
    "cross",
    "cross-no-paths",
    "custom",
)
LINK_KEYS = ("from", "to", "detach", "reduce")
LINK_INITS = ("random", "zero")
MULTIPLE_AGGREGATES = ("concat", "project")
# How the members' outputs are fused: the mean of their softmax probabilities, or the
# cross paper's ensemble rule, "adding the final output[s] of two networks" (logits).
FUSE_RULES = ("mean_prob", "sum_logits")
FUSED = "fused"  # the name of the fused output (never a member's name)


@dataclass(frozen=True)
class Link:
    """``sources`` -> ``target``; each endpoint is ``"member.tap"``."""

    sources: tuple[str, ...]
    target: str
    detach: bool = False
    reduce: int | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str = "link") -> Link:
        """A link from its config form ``{from: a.tap | [..], to: b.tap, detach, reduce}``."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys from/to, got {spec!r}")
        unknown = sorted(set(spec) - set(LINK_KEYS))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown link key; allowed: {LINK_KEYS}")
        if "from" not in spec or "to" not in spec:
            raise ValueError(f"{where}: a link needs 'from' and 'to', got {dict(spec)}")
        sources = spec["from"]
        sources = (sources,) if isinstance(sources, str) else tuple(sources)
        reduce = spec.get("reduce")
        if reduce is not None and (not isinstance(reduce, int) or reduce < 1):
            raise ValueError(f"{where}.reduce: expected a positive integer, got {reduce!r}")
        return cls(sources, str(spec["to"]), bool(spec.get("detach", False)), reduce)


def split_endpoint(endpoint: str) -> tuple[str, str]:
    member, sep, tap = endpoint.partition(".")
    if not sep or not tap:
        raise ValueError(f"link endpoint {endpoint!r} must look like 'member.tap'")
    return member, tap


def default_member_names(count: int) -> list[str]:
    """The papers' names for a pair (``top`` sends, ``bottom`` receives), else ``net<i>``."""
    return ["top", "bottom"] if count == 2 else [f"net{i}" for i in range(count)]


def preset_links(
    preset: str,
    taps: Mapping[str, Mapping[str, TapInfo]],
    *,
    connection1: bool = True,
    connection2: bool = True,
    multiple_aggregate: str = "project",
) -> list[Link]:
    """The link list a preset stands for, given each member's taps (in execution order).

    Which taps a preset links is declared by each architecture (``TapInfo.role``), and
    the one-way and cross presets use the same layer set -- they differ only in
    direction. ``connection1`` / ``connection2`` switch the cross paper's extra
    connections (DeepLabv3+'s backbone and ASPP outputs) for every preset.

    * ``single``: one member, no links. ``ensemble`` / ``cross-no-paths``: no links
      (members trained jointly on the same batches, outputs fused at inference).
    * ``oneway-same``: member i -> member i+1 at every common linked tap.
    * ``oneway-multiple``: per stream group, the sender's taps from shallow to deep
      (linked taps plus send-only ones such as backbone stages) -> the receiver's last
      linked tap of that group; ``multiple_aggregate`` = ``concat`` (the senders' maps,
      resized and concatenated) or ``project`` (a 1x1 conv + BN + ReLU to the
      receiver's own width, so it is exactly twice as wide).
    * ``cross``: both ways between every pair of members at every common linked tap.
    """
    names = list(taps)
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; one of {list(PRESETS)}")
    if multiple_aggregate not in MULTIPLE_AGGREGATES:
        raise ValueError(
            f"model.multiple_aggregate: unknown {multiple_aggregate!r}; "
            f"one of {list(MULTIPLE_AGGREGATES)}"
        )
    if preset == "single":
        if len(names) != 1:
            raise ValueError(f"model.preset: 'single' needs exactly one member, got {len(names)}")
        return []
    if len(names) < 2 and preset != "custom":
        raise ValueError(f"model.preset: {preset!r} needs at least two members")
    if preset in ("ensemble", "cross-no-paths", "custom"):
        return []

    linked = {"same"} | {
        role for role, on in (("connection1", connection1), ("connection2", connection2)) if on
    }

    def common(a: str, b: str) -> list[str]:
        return [
            t
            for t, info in taps[b].items()
            if info.role in linked and info.receives and t in taps[a] and taps[a][t].role in linked
        ]

    links: list[Link] = []
    if preset == "oneway-same":
        for src, dst in pairwise(names):
            links += [Link((f"{src}.{t}",), f"{dst}.{t}") for t in common(src, dst)]
    elif preset == "oneway-multiple":
        reduce_to_width = multiple_aggregate == "project"
        for src, dst in pairwise(names):
            targets: dict[str | None, str] = {}
            for tap, info in taps[dst].items():
                if info.role in linked and info.receives:
                    targets[info.group] = tap  # the deepest linked tap of each group
            for group, target in targets.items():
                sources = tuple(
                    f"{src}.{t}"
                    for t, i in taps[src].items()
                    if i.group == group and i.role in linked | {"send"}
                )
                if sources:
                    width = taps[dst][target].channels if reduce_to_width else None
                    links.append(Link(sources, f"{dst}.{target}", reduce=width))
    elif preset == "cross":
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for tap in common(a, b):
                    links.append(Link((f"{a}.{tap}",), f"{b}.{tap}"))
                    links.append(Link((f"{b}.{tap}",), f"{a}.{tap}"))
    return links


class LinkAggregator(nn.Module):
    """Brings a link's sender maps to the receiver's size (and, with ``reduce``, width)."""

    def __init__(self, source_channels: Sequence[int], reduce: int | None) -> None:
        super().__init__()
        self.reduce = reduce
        if reduce is not None:
            self.project = nn.ModuleList(
                nn.Conv2d(c, reduce, 1, bias=False) for c in source_channels
            )
            self.norm = nn.Sequential(nn.BatchNorm2d(reduce), nn.ReLU(inplace=True))

    def forward(self, maps: Sequence[torch.Tensor], size: torch.Size) -> torch.Tensor:
        if self.reduce is None:
            return torch.cat([_resize(m, size) for m in maps], 1)
        total = None
        for conv, fmap in zip(self.project, maps, strict=True):
            part = _resize(conv(fmap), size)
            total = part if total is None else total + part
        return self.norm(total)


def _kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "arch"}


def check_init_seed(seed: Any, index: int) -> int | None:
    """A member's ``init_seed``: None or a non-negative integer (one line if not)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(
            f"model.members[{index}].init_seed: expected a non-negative integer, got {seed!r}"
        )
    return seed


def build_member(
    spec: Mapping[str, Any],
    extra: Mapping[str, int],
    init_seed: int | None = None,
    link_init: str = "random",
) -> nn.Module:
    """One member, its tap consumers widened by ``extra``.

    Without ``init_seed`` the member draws its initial weights from the global RNG after
    the members before it, so a pair's second member never starts like a single network.
    With ``init_seed`` it is built under its own seed (the global RNG is left untouched)
    and every tensor whose shape the links do not change is copied from the same member
    built alone under that seed: a member starts exactly as a single network of the same
    seed wherever the architecture allows, so single-vs-pair comparisons are paired by
    initialisation, not only by data order (``coopseg bench coop``). Widened layers keep
    their own init, and must: their shapes differ.
    """
    from . import create_model

    arch, kwargs = spec["arch"], _kwargs(spec)
    if init_seed is None:
        return create_model(arch, **kwargs, extra_channels=extra or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        member = create_model(arch, **kwargs, extra_channels=extra or None)
        if extra:
            torch.manual_seed(init_seed)
            alone = create_model(arch, **kwargs)
            own, reference = member.state_dict(), alone.state_dict()
            same = {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}
            member.load_state_dict(same, strict=False)
            if link_init == "zero":
                start_links_at_zero(member, alone, extra)
    return member


def _received_channels(member: nn.Module, extra: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """For each module that takes a link's channels: a mask of its input channels that
    come from a link. Found by running the member alone with NaN in one received map at
    a time (zeros in the others, NaN cleared at every tap): the layers between that tap
    and the next whose inputs hold NaN in some channels but not all consume the link."""
    masks: dict[str, torch.Tensor] = {}

    def record(name: str, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return
        nan = torch.isnan(x).any(dim=(0, 2, 3))
        if 0 < int(nan.sum()) < nan.numel():
            masks[name] = masks[name] | nan if name in masks else nan

    was_training = member.training
    member.eval()  # BN on running statistics: per channel, and nothing updated
    try:
        for probe in extra:
            hooks = [
                module.register_forward_pre_hook(lambda _m, args, n=name: record(n, args[0]))
                for name, module in member.named_modules()
                if any(True for _ in module.parameters(recurse=False))
            ]

            def fill(tap: str, fmap: torch.Tensor, probe: str = probe) -> torch.Tensor:
                fmap = torch.nan_to_num(fmap, nan=0.0)  # NaN stops at the next tap
                if tap not in extra:
                    return fmap
                value = math.nan if tap == probe else 0.0
                shape = (fmap.shape[0], extra[tap], *fmap.shape[2:])
                return torch.cat([fmap, fmap.new_full(shape, value)], 1)

            try:
                with torch.no_grad():
                    x = torch.zeros(1, getattr(member, "in_chans", None) or 3, 64, 64)
                    run_taps(member.forward_taps(x), fill)
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        member.train(was_training)
    return masks


def start_links_at_zero(member: nn.Module, alone: nn.Module, extra: Mapping[str, int]) -> None:
    """Make ``member`` (widened by ``extra``) compute what ``alone`` computes while its
    links carry anything: every widened tensor takes ``alone``'s values on the member's
    own channels; a weight that mixes received channels into the member's own gets zeros
    there (it then learns from the first step, as its input is not zero), and per-channel
    parameters of received channels (a depthwise filter, BN) keep their own init.

    An architecture that mixes received channels before its last widened layer (DANet's
    attention over the concatenation) cannot start so; it is refused with the layer named.
    """
    masks = _received_channels(member, extra)
    reference = dict(alone.named_modules())
    for name, module in member.named_modules():
        if name not in reference:
            continue
        base = reference[name]
        tensors = dict(base.named_parameters(recurse=False)) | dict(
            base.named_buffers(recurse=False)
        )
        for key, value in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            ref = tensors.get(key)
            if ref is None or ref.shape == value.shape:
                continue
            recv = masks.get(name)
            dims = [d for d in range(value.dim()) if value.shape[d] != ref.shape[d]]
            if (
                recv is None
                or len(dims) != 1
                or value.shape[dims[0]] != recv.numel()
                or int((~recv).sum()) != ref.shape[dims[0]]
            ):
                raise ValueError(
                    f"model.link_init: 'zero' cannot start layer {name!r} of this member as "
                    "the member alone (it mixes received channels before this layer); use "
                    "link_init: random"
                )
            own, received = (~recv).nonzero().flatten(), recv.nonzero().flatten()
            with torch.no_grad():
                if dims == [1]:  # mixes channels into the member's own: received ones at 0
                    value[:, own] = ref
                    value[:, received] = 0
                else:  # per channel (depthwise filter, BN): own copied, received kept
                    value[own] = ref


def _resize(fmap: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if fmap.shape[-2:] == size:
        return fmap
    return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)


class CooperativeNet(nn.Module, HubMixin):
    """K member networks and the links between them.

    ``forward`` returns, in training mode, every member's outputs prefixed with its
    name (``"top.out"``, ``"top.aux_position"``, ...), so the loss is the sum of each
    member's own loss. In eval mode it returns ``"fused.out"`` (``fuse``: the log of
    the members' mean softmax probability, or their summed logits) and each member's
    ``"<name>.out"``, the selected output first, and ``"out"``: the selected output,
    which is what a single-output consumer (predict, export, best checkpoint) uses.

    ``report`` picks that output: ``fused``, a member's name, or ``auto`` -- the fused
    output when nothing is linked (ensemble), else the network that receives (the last
    receiving member of a one-way chain; the first member when all receive, as in
    ``cross``, whose paper reports each network's own output). :func:`select_output`
    changes it after construction.
    """

    def __init__(
        self,
        members: Sequence[Mapping[str, Any]],
        preset: str = "custom",
        links: Sequence[Mapping[str, Any]] | None = None,
        num_classes: int | None = None,
        pretrained: Any = None,
        connection1: bool = True,
        connection2: bool = True,
        detach: bool = False,
        multiple_aggregate: str = "project",
        fuse: str = "mean_prob",
        report: str = "auto",
        link_init: str = "random",
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        from . import create_model  # the same table single models come from

        specs = [dict(m) for m in members]
        if not specs:
            raise ValueError("model.members: a cooperative model needs at least one member")
        names = default_member_names(len(specs))
        init_seeds: list[int | None] = []
        for i, spec in enumerate(specs):
            if "arch" not in spec:
                raise ValueError(f"model.members[{i}]: missing 'arch'")
            if "extra_channels" in spec:
                raise ValueError(
                    f"model.members[{i}].extra_channels: set by the links; give links instead"
                )
            names[i] = str(spec.pop("name", names[i]))
            init_seeds.append(check_init_seed(spec.pop("init_seed", None), i))
            if num_classes is not None:
                spec.setdefault("num_classes", num_classes)
            if pretrained is not None:
                spec["pretrained"] = pretrained
            if in_chans is not None:
                spec.setdefault("in_chans", in_chans)
        bands = {int(spec.get("in_chans", 3)) for spec in specs}
        if len(bands) > 1:
            raise ValueError(
                f"model.members: every member reads the same image; in_chans differ: {bands}"
            )
        self.in_chans = bands.pop()
        if len(set(names)) != len(names):
            raise ValueError(f"model.members: member names must be unique, got {names}")
        if {FUSED, "out"} & set(names):
            raise ValueError(f"model.members: {FUSED!r} and 'out' are reserved output names")
        if fuse not in FUSE_RULES:
            raise ValueError(f"model.fuse: unknown rule {fuse!r}; one of {list(FUSE_RULES)}")
        if link_init not in LINK_INITS:
            raise ValueError(f"model.link_init: unknown {link_init!r}; one of {list(LINK_INITS)}")
        if link_init == "zero" and None in init_seeds:
            missing = init_seeds.index(None)
            raise ValueError(
                f"model.link_init: 'zero' starts each member as the member alone, which needs "
                f"model.members[{missing}].init_seed"
            )
        self.link_init = link_init
        self.fuse = fuse
        self.preset = preset
        self.member_specs = dict(zip(names, specs, strict=True))  # as given, before widening

        # Tap layouts need no weights: read them from members built on the meta device.
        def probe_taps(extra: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, TapInfo]]:
            out = {}
            for name, spec in zip(names, specs, strict=True):
                kwargs = {**_kwargs(spec), "pretrained": False, "extra_channels": extra[name]}
                with torch.device("meta"):
                    out[name] = dict(create_model(spec["arch"], **kwargs).tap_info)
            return out

        extra: dict[str, dict[str, int]] = {name: {} for name in names}
        taps = probe_taps(extra)
        all_links = preset_links(
            preset,
            taps,
            connection1=connection1,
            connection2=connection2,
            multiple_aggregate=multiple_aggregate,
        )
        all_links += [Link.from_spec(s, f"model.links[{i}]") for i, s in enumerate(links or [])]
        if detach:
            all_links = [Link(k.sources, k.target, True, k.reduce) for k in all_links]
        self.links = all_links
        self.tap_order = {n: list(t) for n, t in taps.items()}
        # A widened layer can widen the map at a later tap (DANet's attention runs on
        # the concatenation), and that map may itself be sent: widen until stable.
        for _ in range(len(self.links) + 1):
            new_extra = self._check_links(taps)
            if new_extra == extra:
                break
            extra = new_extra
            taps = probe_taps(extra)
        else:  # pragma: no cover - widths only grow along the tap order
            raise ValueError("link widths do not settle; a link feeds its own sender")

        self.members = nn.ModuleDict(
            {
                name: build_member(spec, extra[name], seed, link_init)
                for name, spec, seed in zip(names, specs, init_seeds, strict=True)
            }
        )
        self.aggregators = nn.ModuleList(
            LinkAggregator(
                [taps[m][t].channels for m, t in map(split_endpoint, link.sources)], link.reduce
            )
            for link in self.links
        )
        self.default_aux_weights = {
            f"{name}.{key}": weight
            for name, member in self.members.items()
            for key, weight in getattr(member, "default_aux_weights", {}).items()
        }
        self._incoming: dict[str, list[int]] = {}
        for index, link in enumerate(self.links):
            self._incoming.setdefault(link.target, []).append(index)
        self._needed = {s for link in self.links for s in link.sources}
        receivers = [n for n in names if any(t.startswith(f"{n}.") for t in self._incoming)]
        if report == "auto":
            if len(names) == 1:
                report = names[0]
            elif not receivers:
                report = FUSED
            else:
                report = names[0] if len(receivers) == len(names) else receivers[-1]
        self.output = check_output_name(report, names, "model.report")

    @property
    def member_names(self) -> list[str]:
        return list(self.members)

    def _check_links(self, taps: Mapping[str, Mapping[str, TapInfo]]) -> dict[str, dict]:
        """Validate endpoints, stream groups and the schedule; return widening per member."""
        extra: dict[str, dict[str, int]] = {name: {} for name in taps}
        for index, link in enumerate(self.links):
            where = f"link {index} ({', '.join(link.sources)} -> {link.target})"
            endpoints = [*link.sources, link.target]
            infos = []
            for endpoint in endpoints:
                member, tap = split_endpoint(endpoint)
                if member not in taps:
                    raise ValueError(f"{where}: no member {member!r}; members: {list(taps)}")
                if tap not in taps[member]:
                    raise ValueError(
                        f"{where}: member {member!r} has no tap {tap!r}; "
                        f"its taps: {list(taps[member])}"
                    )
                infos.append(taps[member][tap])
            if not infos[-1].receives:
                raise ValueError(
                    f"{where}: {link.target} is read-only (computed with the layers "
                    "after it); it can send but not receive"
                )
            target_member = split_endpoint(link.target)[0]
            if any(split_endpoint(s)[0] == target_member for s in link.sources):
                raise ValueError(f"{where}: a member cannot link to itself")
            groups = {i.group for i in infos} - {None}
            if len(groups) > 1:
                raise ValueError(
                    f"{where}: joins taps of different streams {sorted(groups)}; "
                    "links must stay inside one stream"
                )
            added = link.reduce or sum(i.channels for i in infos[:-1])
            member, tap = split_endpoint(link.target)
            extra[member][tap] = extra[member].get(tap, 0) + added
        self._check_schedule(taps)
        return extra

    def _check_schedule(self, taps: Mapping[str, Mapping[str, TapInfo]]) -> None:
        """Dry-run the lockstep schedule on tap names; refuse a graph that deadlocks."""
        position = dict.fromkeys(taps, 0)
        produced: set[str] = set()
        needs: dict[str, set[str]] = {}
        for link in self.links:
            needs.setdefault(link.target, set()).update(link.sources)
        order = {m: list(t) for m, t in taps.items()}
        while any(position[m] < len(order[m]) for m in order):
            for m in order:
                if position[m] < len(order[m]):
                    produced.add(f"{m}.{order[m][position[m]]}")
            moved = False
            for m in order:
                if position[m] >= len(order[m]):
                    continue
                here = f"{m}.{order[m][position[m]]}"
                if needs.get(here, set()) <= produced:
                    position[m] += 1
                    moved = True
            if not moved:
                waiting = {
                    f"{m}.{order[m][position[m]]}": sorted(
                        needs.get(f"{m}.{order[m][position[m]]}", set()) - produced
                    )
                    for m in order
                    if position[m] < len(order[m])
                }
                raise ValueError(f"links form a cycle the members cannot run: waiting {waiting}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        streams: dict[str, TapStream] = {n: m.forward_taps(x) for n, m in self.members.items()}
        pending: dict[str, tuple[str, torch.Tensor]] = {}
        produced: dict[str, torch.Tensor] = {}
        results: dict[str, dict[str, torch.Tensor]] = {}

        def advance(name: str, sent: torch.Tensor | None) -> None:
            try:
                tap, fmap = next(streams[name]) if sent is None else streams[name].send(sent)
            except StopIteration as stop:
                results[name] = stop.value
                pending.pop(name, None)
                return
            key = f"{name}.{tap}"
            if key in self._needed:
                produced[key] = fmap
            pending[name] = (tap, fmap)

        for name in streams:
            advance(name, None)
        while pending:
            moved = False
            for name in list(pending):
                tap, fmap = pending[name]
                incoming = self._incoming.get(f"{name}.{tap}")
                if incoming:
                    sources = [s for i in incoming for s in self.links[i].sources]
                    if any(s not in produced for s in sources):
                        continue
                    parts = [fmap]
                    for i in incoming:
                        link = self.links[i]
                        maps = [produced[s] for s in link.sources]
                        if link.detach:
                            maps = [m.detach() for m in maps]
                        parts.append(self.aggregators[i](maps, fmap.shape[-2:]))
                    fmap = torch.cat(parts, 1)
                advance(name, fmap)
                moved = True
            if not moved:  # pragma: no cover - _check_schedule refuses such graphs
                raise RuntimeError(f"cooperative members deadlocked at {pending.keys()}")
        return self._outputs(results)

    def _outputs(self, results: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
        out = {
            f"{name}.{key}": value for name, res in results.items() for key, value in res.items()
        }
        if self.training:
            return out
        if len(results) == 1:
            return {"out": next(iter(results.values()))["out"]}
        if self.fuse == "sum_logits":
            fused = torch.stack([res["out"].float() for res in results.values()]).sum(0)
        else:
            log_probs = torch.stack([r["out"].float().log_softmax(1) for r in results.values()])
            fused = torch.logsumexp(log_probs, 0) - math.log(len(results))
        scores = {f"{FUSED}.out": fused, **{f"{n}.out": r["out"] for n, r in results.items()}}
        selected = f"{self.output}.out"
        return {"out": scores[selected], selected: scores[selected], **scores, **out}


def check_output_name(choice: str, members: Sequence[str], where: str) -> str:
    """``choice`` if it names an output of a model with these members (one line if not)."""
    allowed = [FUSED, *members] if len(members) > 1 else list(members)
    if choice not in allowed:
        raise ValueError(f"{where}: unknown output {choice!r}; one of {allowed}")
    return choice


def output_names(model: nn.Module) -> list[str]:
    """The outputs :func:`select_output` accepts: ``fused`` and each member, or ``out``."""
    if isinstance(model, CooperativeNet) and len(model.members) > 1:
        return [FUSED, *model.member_names]
    return ["out"]


def select_output(model: nn.Module, choice: str | None = None) -> str:
    """Make ``model``'s eval-mode ``"out"`` the output ``choice`` (None: the model's
    configured ``report``) and return its name; raises ValueError naming the choices.

    Non-cooperative models have one output: only None and ``"out"`` are accepted."""
    inner = getattr(model, "module", model)  # DDP / compiled wrappers
    if not isinstance(inner, CooperativeNet) or len(inner.members) == 1:
        if choice not in (None, "out"):
            raise ValueError(f"--output {choice}: this model has one output ('out')")
        return "out"
    if choice is not None:
        inner.output = check_output_name(choice, inner.member_names, "--output")
    return inner.output


def standalone(model: nn.Module, output: str) -> nn.Module:
    """The network that computes ``output`` alone: a member of a cooperative model that
    receives no link (an ensemble or mutual-learning member, a one-way sender) runs
    without its partners, so predicting or exporting it costs one network; otherwise
    ``model`` itself (a receiver needs its senders' maps, the fused output every member)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, CooperativeNet) or output not in inner.members:
        return model
    if any(target.startswith(f"{output}.") for target in inner._incoming):
        return model
    return inner.members[output]


def check_cooperative_section(model: Mapping[str, Any], check_member) -> None:
    """Config-time checks: each member section against its own architecture."""
    members = model.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError("model.members: expected a non-empty list of member sections")
    for i, member in enumerate(members):
        if not isinstance(member, Mapping):
            raise ValueError(f"model.members[{i}]: expected a mapping, got {member!r}")
        check_init_seed(member.get("init_seed"), i)
        own = {k: v for k, v in member.items() if k not in ("name", "init_seed")}
        check_member(own, f"model.members[{i}]")
    for i, spec in enumerate(model.get("links") or []):
        Link.from_spec(spec, f"model.links[{i}]")
