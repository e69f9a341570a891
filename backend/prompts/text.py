"""Text prompts → one GroundingDINO caption whose phrases each belong to a label, and the thresholds to apply.

Pre-annotation asks for every label of the project's BrushLabels/PolygonLabels/RectangleLabels controls, each through
its phrases (Label Studio's `predicted_values="a,b"` attribute, else the label's value). A typed prompt ("car,
wheel") is split into phrases; each phrase takes the label the annotator selected, else the label named by a
"Label: words" prefix, else the label whose name or phrase it contains, else the only label there is.
The phrases are joined as GroundingDINO was trained to read them: "car . wheel . tyre ."
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backend.errors import PromptError
from backend.protocol.label_config import ProjectConfig

# At most this many phrases in one caption; GroundingDINO itself reads at most 256 tokens of it.
MAX_PHRASES = 64
SEPARATORS = re.compile(r"[,.;|\n\r\t]+")
# GroundingDINO treats "." and "?" as the ends of phrases, so none may remain inside one.
NOT_IN_PHRASE = re.compile(r"[,.;:?|\s]+")
CAPTION_SEPARATOR = " . "


def normalise_phrase(text: str) -> str:
    """Lowercase words separated by single spaces, without the punctuation that would split it."""
    return " ".join(NOT_IN_PHRASE.sub(" ", text).lower().split())


@dataclass(frozen=True)
class TextQuery:
    """A caption and, for each of its phrases, the character span and the label it detects."""

    caption: str
    spans: tuple[tuple[int, int], ...]
    labels: tuple[str, ...]

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(self.caption[start:end] for start, end in self.spans)

    @property
    def label_groups(self) -> list[int]:
        """Per phrase, the index of its label: boxes are de-duplicated within a label, not within a phrase."""
        order = list(dict.fromkeys(self.labels))
        return [order.index(label) for label in self.labels]


def build_query(phrase_labels: list[tuple[str, str]]) -> TextQuery:
    """A caption from (phrase, label) pairs; a phrase given twice keeps its first label."""
    labels_by_phrase: dict[str, str] = {}
    for phrase, label in phrase_labels:
        cleaned = normalise_phrase(phrase)
        if cleaned:
            labels_by_phrase.setdefault(cleaned, label)
    if not labels_by_phrase:
        raise PromptError("there is no phrase to detect", 422)
    if len(labels_by_phrase) > MAX_PHRASES:
        raise PromptError(
            f"{len(labels_by_phrase)} phrases to detect; at most {MAX_PHRASES} fit in one GroundingDINO caption", 413
        )
    spans, cursor = [], 0
    for phrase in labels_by_phrase:
        spans.append((cursor, cursor + len(phrase)))
        cursor += len(phrase) + len(CAPTION_SEPARATOR)
    caption = CAPTION_SEPARATOR.join(labels_by_phrase) + CAPTION_SEPARATOR.rstrip()
    return TextQuery(caption, tuple(spans), tuple(labels_by_phrase.values()))


def target_labels(config: ProjectConfig) -> list[str]:
    """The labels detections can carry: those of the BrushLabels, PolygonLabels and RectangleLabels controls, in
    order."""
    controls = config.output_controls
    if not controls:
        raise PromptError(
            "the label config has no BrushLabels, PolygonLabels or RectangleLabels control for the image to put "
            "detections in",
            422,
        )
    return list(dict.fromkeys(label for control in controls for label in control.labels))


def labels_query(config: ProjectConfig) -> TextQuery:
    """The caption that pre-annotation detects: every target label through its phrases."""
    return phrases_query(target_labels(config), config.phrases)


def phrases_query(labels: Sequence[str], phrases: Mapping[str, Sequence[str]]) -> TextQuery:
    """The caption detecting each of `labels` through its phrases (predicted_values), else its own name: an image
    project's target labels, a video project's labels."""
    return build_query([(phrase, label) for label in labels for phrase in phrases.get(label, (label,))])


def _words_contain(phrase: str, part: str) -> bool:
    """`part` appears in `phrase` as whole words, in the singular or with an English plural ending."""
    return re.search(rf"(?<!\w){re.escape(part)}(?:e?s)?(?!\w)", phrase) is not None


def _phrase_and_label(phrase: str, labels: list[str], config: ProjectConfig) -> tuple[str, str]:
    """(phrase to detect, label) for one typed phrase, or a 422 naming the labels it could have meant."""
    by_name = {normalise_phrase(label): label for label in labels}
    prefix, colon, rest = phrase.partition(":")
    if colon and normalise_phrase(prefix) in by_name and normalise_phrase(rest):
        return rest, by_name[normalise_phrase(prefix)]
    cleaned = normalise_phrase(phrase)
    names = [(normalise_phrase(name), label) for label in labels for name in (label, *config.phrases.get(label, ()))]
    contained = [(len(name), label) for name, label in names if name and _words_contain(cleaned, name)]
    if contained:
        return phrase, max(contained)[1]
    if len(labels) == 1:
        return phrase, labels[0]
    raise PromptError(
        f"the phrase {cleaned!r} names none of the labels {labels}; type a label (or one of its predicted_values), "
        "write 'Label: words', or select a label",
        422,
    )


def text_query(texts: list[str], config: ProjectConfig, selected_label: str | None = None) -> TextQuery:
    """The caption for a typed prompt (one or more TextArea values)."""
    if not any(text.strip() for text in texts):
        raise PromptError("the text prompt is empty", 422)
    phrases = [part for text in texts for part in SEPARATORS.split(text) if normalise_phrase(part)]
    if not phrases:
        raise PromptError("the text prompt holds only separators; type words such as 'car, wheel'", 422)
    labels = target_labels(config)
    if selected_label is not None:
        if selected_label not in labels:
            raise PromptError(f"the selected label {selected_label!r} is not one of {labels}", 422)
        return build_query([(phrase, selected_label) for phrase in phrases])
    return build_query([_phrase_and_label(phrase, labels, config) for phrase in phrases])


@dataclass(frozen=True)
class Thresholds:
    box: float
    text: float


def thresholds_for(config: ProjectConfig, default_box: float, default_text: float) -> Thresholds:
    """The project's `<Number name="box_threshold"/"text_threshold">` defaults, else the environment's."""
    box = config.numbers.get("box_threshold", default_box)
    text = config.numbers.get("text_threshold", default_text)
    for name, value in (("box_threshold", box), ("text_threshold", text)):
        if not 0.0 <= value <= 1.0:
            raise PromptError(f"{name} must lie between 0 and 1, got {value}", 422)
    return Thresholds(box, text)
