"""A project's label config, read with label-studio-sdk, reduced to what the backend needs.

Controls are found by tag type (BrushLabels, PolygonLabels, KeyPointLabels, RectangleLabels, TextArea, Number),
never by name, so any project that uses these tags works whatever it called them. One attribute of the backend's
own marks SAM 3's exemplar control: a RectangleLabels with `exemplar="true"` (boxes alone) or `exemplar="text"`
(boxes and the label's text) asks for every object like the boxes drawn with it, and is no output control.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Control:
    name: str
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ProjectConfig:
    image_name: str  # the Image tag's name, the to_name of every result
    image_field: str  # the task data key holding the image URL
    brush: Control | None
    rectangle: Control | None
    polygon: Control | None
    keypoint: Control | None
    text_prompt: Control | None
    exemplar: Control | None = None  # the RectangleLabels marked exemplar="true" or "text": SAM 3's exemplar boxes
    exemplar_text: bool = False  # exemplar="text": the label's first phrase goes with its exemplar boxes
    phrases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> phrases that detect it
    numbers: dict[str, float] = field(default_factory=dict)  # Number controls' default values by name

    @property
    def output_controls(self) -> tuple[Control, ...]:
        """The controls answers go into: BrushLabels and PolygonLabels take masks, RectangleLabels boxes."""
        return tuple(control for control in (self.brush, self.polygon, self.rectangle) if control is not None)

    @property
    def mask_labels(self) -> tuple[str, ...]:
        """The labels a BrushLabels or PolygonLabels control has: objects of these get SAM's mask."""
        controls = (self.brush, self.polygon)
        return tuple(dict.fromkeys(label for control in controls if control is not None for label in control.labels))

    def check_output_label(self, label: str) -> None:
        """A smart region's label must be one a BrushLabels, PolygonLabels or RectangleLabels control outputs."""
        if not self.output_controls:
            raise ConfigError(
                "the label config has no BrushLabels, PolygonLabels or RectangleLabels control to put answers in"
            )
        if not any(label in control.labels for control in self.output_controls):
            names = ", ".join(repr(control.name) for control in self.output_controls)
            raise ConfigError(f"label {label!r} is not a label of the controls {names}")


# The values of a RectangleLabels' `exemplar` attribute that make it the exemplar control.
EXEMPLAR_MODES = ("true", "text")


def _exemplar_mode(control: object) -> str | None:
    mode = str((getattr(control, "attr", None) or {}).get("exemplar", "")).strip().lower()
    return mode if mode in EXEMPLAR_MODES else None


def _control(interface: LabelInterface, tag: str, image_name: str, exemplar: bool = False) -> Control | None:
    """The first control of `tag` on the image; `exemplar` picks the exemplar control, else it is passed over."""
    for control in interface.controls:
        marked = _exemplar_mode(control) is not None and tag == "RectangleLabels"
        if control.tag == tag and image_name in control.to_name and marked == exemplar:
            return Control(control.name, image_name, tuple(control.labels or ()))
    return None


def _phrases(
    interface: LabelInterface,
    image_name: str,
    tags: tuple[str, ...] = ("BrushLabels", "PolygonLabels", "RectangleLabels"),
) -> dict[str, tuple[str, ...]]:
    phrases: dict[str, tuple[str, ...]] = {}
    for control in interface.controls:
        if control.tag not in tags or image_name not in control.to_name or _exemplar_mode(control) is not None:
            continue  # the exemplar control's labels name no phrases: it may come first with bare labels
        for label, label_tag in (control.labels_attrs or {}).items():
            raw = (label_tag.attr or {}).get("predicted_values", "")
            wanted = tuple(phrase.strip() for phrase in raw.split(",") if phrase.strip()) or (label,)
            phrases.setdefault(label, wanted)
    return phrases


# Label Studio's frame rate for a <Video> tag that states none (its editor's default).
DEFAULT_FRAMERATE = 24.0


@dataclass(frozen=True)
class VideoConfig:
    """A video project: its <Video> tag, the VideoRectangle control tracks go into and the labels they may carry."""

    video_name: str  # the Video tag's name, the to_name of every result
    video_field: str  # the task data key holding the video URL
    framerate: float  # the Video tag's framerate: Label Studio numbers frames by it, not by the file's own rate
    rectangle: str  # the VideoRectangle control's name, the from_name of every track
    labels: tuple[str, ...]  # the labels of the Labels controls on the video
    phrases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> phrases that detect it


def _interface(xml: object) -> LabelInterface:
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("label_config is missing")
    try:
        return LabelInterface(xml)
    except Exception as error:  # the SDK raises many kinds of errors for bad XML
        raise ConfigError(f"label_config is not a valid Label Studio config: {error}") from error


@functools.lru_cache(maxsize=64)
def parse_video_config(xml: str) -> VideoConfig | None:
    """The config's <Video> project, or None when it has no Video tag (an image project); ConfigError naming what to
    add when the video has no VideoRectangle control to put tracks in."""
    interface = _interface(xml)
    videos = [obj for obj in interface.objects if obj.tag == "Video"]
    if not videos:
        return None
    video = videos[0]
    value = video.value or ""
    if not value.startswith("$"):
        raise ConfigError(f"the Video tag's value {value!r} is not a task field like $video")
    rectangles = [c for c in interface.controls if c.tag == "VideoRectangle" and video.name in c.to_name]
    if not rectangles:
        raise ConfigError(
            f"the label config has no VideoRectangle control for the Video {video.name!r} to put tracks in; add one, "
            f'e.g. <VideoRectangle name="box" toName="{video.name}"/>'
        )
    raw_rate = (video.attr or {}).get("framerate")
    try:
        framerate = float(raw_rate) if raw_rate not in (None, "") else DEFAULT_FRAMERATE
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the Video tag's framerate {raw_rate!r} is not a number") from error
    if not 0 < framerate <= 1000:
        raise ConfigError(f"the Video tag's framerate {raw_rate!r} is not a frame rate (0 to 1000)")
    label_controls = [c for c in interface.controls if c.tag == "Labels" and video.name in c.to_name]
    labels = tuple(dict.fromkeys(label for control in label_controls for label in control.labels or ()))
    return VideoConfig(
        video_name=video.name,
        video_field=value[1:],
        framerate=framerate,
        rectangle=rectangles[0].name,
        labels=labels,
        phrases=_phrases(interface, video.name, ("Labels",)),
    )


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> ProjectConfig:
    """Parse once per distinct config: Label Studio sends the whole XML with every request."""
    interface = _interface(xml)
    images = [obj for obj in interface.objects if obj.tag == "Image"]
    if not images:
        raise ConfigError("the label config has no Image tag")
    image = images[0]
    value = image.value or ""
    if not value.startswith("$"):
        raise ConfigError(f"the Image tag's value {value!r} is not a task field like $image")
    numbers = {}
    for control in interface.controls:
        if control.tag == "Number":
            default = (control.attr or {}).get("defaultValue")
            if default is None:
                continue
            try:
                numbers[control.name] = float(default)
            except (TypeError, ValueError):
                continue
    exemplar = _control(interface, "RectangleLabels", image.name, exemplar=True)
    return ProjectConfig(
        image_name=image.name,
        image_field=value[1:],
        brush=_control(interface, "BrushLabels", image.name),
        rectangle=_control(interface, "RectangleLabels", image.name),
        polygon=_control(interface, "PolygonLabels", image.name),
        keypoint=_control(interface, "KeyPointLabels", image.name),
        text_prompt=_control(interface, "TextArea", image.name),
        exemplar=exemplar,
        exemplar_text=exemplar is not None and _exemplar_mode(interface.get_control(exemplar.name)) == "text",
        phrases=_phrases(interface, image.name),
        numbers=numbers,
    )
