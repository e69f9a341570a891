"""Detections on every Nth frame of a video → one chain per object, for zero-click video pre-annotation.

A detector sees each frame alone, so the same car found on frames 0, 25 and 50 is three detections. Linking turns
them into identities, one chain per object, which the tracker then follows with the chain's detections as keyframes.

The rule (docs/video.md, "Zero-click pre-annotation"): the detection frames are visited in order. On each, every
open chain of a label predicts where its object is: its last box, moved on at the velocity of its last two boxes
(constant motion; a chain of one box stays where it was). Each detection is linked to the open chain of the same
label whose prediction it overlaps best, at an IoU of at least `LINK_IOU`, greedily, the best-overlapping pair first,
each chain and each detection at most once; a detection left over starts a new chain. A chain that no detection
joined on `MAX_MISSED` detection frames in a row ends: a later detection there is a new object. Labels never mix.

The cost is bounded: a frame's linking compares its detections with the open chains of their label only, and uses
no model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from backend.outcomes import box_iou

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

LINK_IOU = 0.3  # least overlap of a detection with a chain's predicted box for it to join the chain
MAX_MISSED = 2  # detection frames in a row a chain may go unmatched before it ends


@dataclass(frozen=True)
class FrameDetection:
    """One box the detector found on one decoded frame (0-based), with the label its phrase detects."""

    frame: int
    box: Box
    score: float
    label: str


@dataclass
class Chain:
    """One object's detections, in frame order."""

    label: str
    detections: list[FrameDetection] = field(default_factory=list)
    missed: int = 0  # detection frames since the last one joined

    @property
    def strength(self) -> float:
        """How sure the detector was of this object across the video: the sum of its detections' scores (a chain
        seen often and confidently first)."""
        return sum(detection.score for detection in self.detections)

    def predicted(self, frame: int) -> Box:
        """Where the object should be on `frame`: the last box moved on at the last two boxes' velocity."""
        last = self.detections[-1]
        if len(self.detections) < 2:
            return last.box
        before = self.detections[-2]
        steps = (frame - last.frame) / max(1, last.frame - before.frame)
        dx = ((last.box[0] + last.box[2]) - (before.box[0] + before.box[2])) / 2 * steps
        dy = ((last.box[1] + last.box[3]) - (before.box[1] + before.box[3])) / 2 * steps
        x0, y0, x1, y1 = last.box
        return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)


def link_detections(frames: Iterable[Sequence[FrameDetection]]) -> list[Chain]:
    """Every chain, in the order they started; `frames` holds each detection frame's detections, frames in order
    (a frame with none still counts towards `MAX_MISSED`)."""
    chains: list[Chain] = []
    open_chains: list[Chain] = []
    for detections in frames:
        pairs = []
        for number, detection in enumerate(detections):
            for chain in open_chains:
                if chain.label == detection.label:
                    overlap = box_iou(chain.predicted(detection.frame), detection.box)
                    if overlap >= LINK_IOU:
                        pairs.append((overlap, number, chain))
        pairs.sort(key=lambda pair: -pair[0])
        joined: set[int] = set()
        linked: set[int] = set()
        for _, number, chain in pairs:
            if number in linked or id(chain) in joined:
                continue
            chain.detections.append(detections[number])
            linked.add(number)
            joined.add(id(chain))
        for chain in open_chains:
            chain.missed = 0 if id(chain) in joined else chain.missed + 1
        open_chains = [chain for chain in open_chains if chain.missed < MAX_MISSED]
        for number, detection in enumerate(detections):
            if number not in linked:
                chain = Chain(detection.label, [detection])
                chains.append(chain)
                open_chains.append(chain)
    return chains


def strongest(chains: Sequence[Chain], most: int) -> list[Chain]:
    """At most `most` chains (MAX_VIDEO_OBJECTS), the strongest kept, in the order they started."""
    kept = sorted(range(len(chains)), key=lambda number: -chains[number].strength)[:most]
    return [chains[number] for number in sorted(kept)]
