"""Named feature taps: the seam through which cooperative networks exchange maps.

A tapped network writes its forward as a generator, ``forward_taps``, that *yields*
``(tap_name, feature_map)`` at each named point and continues with whatever map is
sent back. Used alone, the map comes back unchanged (``run_taps``). Inside a
cooperative model, a driver advances several members in lockstep and sends back the
member's map concatenated with its partners' maps, so two-way links need no second
copy of any architecture. The layer that consumes a tap is built ``extra_channels[tap]``
channels wider at construction, which is all a network needs to know about links.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .hub_mixin import HubMixin

TapStream = Generator[tuple[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TapInfo:
    """What flows through a tap: channel count, stride relative to the input, and
    the stream it belongs to (e.g. DANet's ``"position"``/``"channel"``; ``None`` for
    taps outside any stream). Cooperative links never join taps of different streams.

    ``role`` says which cooperative presets link the tap, so that the one-way and the
    cross presets of a given architecture use the same layers:

    * ``"same"``: linked by the same-layer presets (``oneway-same``, ``cross``) and sent
      by ``oneway-multiple``;
    * ``"connection1"`` / ``"connection2"``: like ``"same"`` when that switch is on (the
      cross paper's extra connections: DeepLabv3+'s backbone and ASPP outputs);
    * ``"send"``: only sent by ``oneway-multiple`` (a shallower layer of the sender);
    * ``None``: never linked by a preset; ``model.links`` may still name it.

    ``receives`` is False for taps whose map is only read (backbone stages computed in
    one call): a link may send from them but not to them.
    """

    channels: int
    stride: int
    group: str | None = None
    role: str | None = "same"
    receives: bool = True


def run_taps(
    stream: TapStream,
    on_tap: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Drive one tap stream to its end; ``on_tap`` may replace each map (default: keep)."""
    try:
        name, fmap = next(stream)
        while True:
            name, fmap = stream.send(fmap if on_tap is None else on_tap(name, fmap))
    except StopIteration as stop:
        return stop.value


class TappedNetwork(nn.Module, HubMixin):
    """Base class of every segmentation network in coopseg.

    ``forward(x)`` returns a dict: ``"out"`` holds logits at the input's size; in
    training mode auxiliary logits may be added under their own names (their loss
    weights come from the config).
    """

    tap_info: dict[str, TapInfo]

    def forward_taps(self, x: torch.Tensor) -> TapStream:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return run_taps(self.forward_taps(x))

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(self.tap_info)


def check_extra_channels(
    extra: Mapping[str, int] | None, known: Mapping[str, TapInfo], arch: str
) -> dict[str, int]:
    """Validate a widening request against the taps an architecture has."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ValueError(f"{arch} has no tap(s) {unknown}; its taps are {list(known)}")
    bad = {k: v for k, v in extra.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"{arch}: extra channels must be non-negative integers, got {bad}")
    return extra
