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

Decisions where the papers are silent:

* Gradients flow through links into the sender by default (the papers train both
  networks end to end with the summed loss); ``detach=True`` per link or globally cuts
  the path so the sender learns only from its own loss.
* Multiple-layer links aggregate by concatenation. With ``reduce=N`` the concatenation
  goes through a 1x1 conv + BN + ReLU to N channels. The preset ``oneway-multiple``
  reduces to the receiving tap's own width, so the receiver is exactly twice as wide as
  alone, as in the paper; it is computed as per-sender 1x1 convs at each sender's own
  resolution, resized and summed (equal to concat-then-1x1, because resizing and a 1x1
  conv commute, and much cheaper when deep maps are upsampled).
* Taps carry a stream ``group`` (DANet: ``position``/``channel``); a link never joins
  taps of two different groups (a tap without a group, like a backbone output, may
  feed or receive from any).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .taps import TapInfo, TapStream

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
# Taps the cross preset links only when asked (the cross paper's Connection 1 and 2).
CONNECTION_TAPS = {"connection1": "backbone", "connection2": "aspp"}


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
) -> list[Link]:
    """The link list a preset stands for, given each member's taps (in execution order).

    * ``single``: one member, no links. ``ensemble`` / ``cross-no-paths``: no links
      (members trained jointly on the same batches, outputs fused at inference).
    * ``oneway-same``: member i -> member i+1 at every tap both have, except the
      backbone output (the head's layers, as in the feature-sharing paper).
    * ``oneway-multiple``: per stream group, every tap of member i -> the last tap of
      that group in member i+1, reduced to that tap's width.
    * ``cross``: two-way between every pair of members at every common head tap;
      ``connection1`` adds the backbone output, ``connection2`` the ASPP output (the
      cross paper's extra connections; both on in its final model).
    """
    names = list(taps)
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; one of {list(PRESETS)}")
    if preset == "single":
        if len(names) != 1:
            raise ValueError(f"model.preset: 'single' needs exactly one member, got {len(names)}")
        return []
    if len(names) < 2 and preset != "custom":
        raise ValueError(f"model.preset: {preset!r} needs at least two members")
    if preset in ("ensemble", "cross-no-paths", "custom"):
        return []

    def common(a: str, b: str) -> list[str]:
        return [t for t in taps[b] if t in taps[a]]

    links: list[Link] = []
    if preset == "oneway-same":
        for src, dst in pairwise(names):
            links += [
                Link((f"{src}.{t}",), f"{dst}.{t}") for t in common(src, dst) if t != "backbone"
            ]
    elif preset == "oneway-multiple":
        for src, dst in pairwise(names):
            groups: dict[str | None, str] = {}
            for tap, info in taps[dst].items():
                groups[info.group] = tap  # last tap of each group wins
            for group, target in groups.items():
                sources = tuple(f"{src}.{t}" for t, i in taps[src].items() if i.group == group)
                if sources:
                    width = taps[dst][target].channels
                    links.append(Link(sources, f"{dst}.{target}", reduce=width))
    elif preset == "cross":
        skip = set()
        if not connection1:
            skip.add(CONNECTION_TAPS["connection1"])
        if not connection2:
            skip.add(CONNECTION_TAPS["connection2"])
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for tap in common(a, b):
                    if tap in skip:
                        continue
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


def _resize(fmap: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if fmap.shape[-2:] == size:
        return fmap
    return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)


class CooperativeNet(nn.Module):
    """K member networks and the links between them.

    ``forward`` returns, in training mode, every member's outputs prefixed with its
    name (``"top.out"``, ``"top.aux_position"``, ...), so the loss is the sum of each
    member's own loss. In eval mode it returns ``"out"`` -- the fused prediction, the
    log of the members' mean softmax probability -- plus each member's ``"<name>.out"``.
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
    ) -> None:
        super().__init__()
        from . import create_model  # the same table single models come from

        specs = [dict(m) for m in members]
        if not specs:
            raise ValueError("model.members: a cooperative model needs at least one member")
        names = default_member_names(len(specs))
        for i, spec in enumerate(specs):
            if "arch" not in spec:
                raise ValueError(f"model.members[{i}]: missing 'arch'")
            if "extra_channels" in spec:
                raise ValueError(
                    f"model.members[{i}].extra_channels: set by the links; give links instead"
                )
            names[i] = str(spec.pop("name", names[i]))
            if num_classes is not None:
                spec.setdefault("num_classes", num_classes)
            if pretrained is not None:
                spec["pretrained"] = pretrained
        if len(set(names)) != len(names):
            raise ValueError(f"model.members: member names must be unique, got {names}")
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
        all_links = preset_links(preset, taps, connection1=connection1, connection2=connection2)
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
                name: create_model(
                    spec["arch"], **_kwargs(spec), extra_channels=extra[name] or None
                )
                for name, spec in zip(names, specs, strict=True)
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
        log_probs = torch.stack([res["out"].float().log_softmax(1) for res in results.values()])
        fused = torch.logsumexp(log_probs, 0) - torch.log(torch.tensor(float(len(results))))
        return {"out": fused, **out}


def check_cooperative_section(model: Mapping[str, Any], check_member) -> None:
    """Config-time checks: each member section against its own architecture."""
    members = model.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError("model.members: expected a non-empty list of member sections")
    for i, member in enumerate(members):
        if not isinstance(member, Mapping):
            raise ValueError(f"model.members[{i}]: expected a mapping, got {member!r}")
        check_member({k: v for k, v in member.items() if k != "name"}, f"model.members[{i}]")
    for i, spec in enumerate(model.get("links") or []):
        Link.from_spec(spec, f"model.links[{i}]")
