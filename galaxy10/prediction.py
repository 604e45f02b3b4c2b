"""What a prediction says: one image's answer, declared once (`Prediction`). Every output derives from it:
the command line's lines (`ResultLines`), the table's columns (catalog.py's CSV and Parquet schema, from
`ANSWERS`), the JSON API's response model (web.py, from `ANSWERS`) and the page's facts
(image_result.html, through `Prediction.page_facts`).

To add an output field, add it to `Prediction` with `answer(...)` (its meaning, and how the line and the
page show it) and fill it in `Prediction.of`: every output then carries it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from galaxy10 import trust

# The Python types an answer field may have, by the name its annotation gives (annotations are strings).
ANSWER_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Answer:
    """How one field of a prediction is shown: what it means (the API's schema and docs/inference.md say
    it), its column in the command line's lines (a format spec and a heading; none: not shown there) and
    its label on the result page (none: the page shows it its own way)."""

    help: str
    line: str = ""
    heading: str = ""
    page: str = ""


def answer(help: str, *, line: str = "", heading: str = "", page: str = "") -> Any:
    """A Prediction field that every output carries (see Answer)."""
    return field(metadata={"answer": Answer(help, line, heading, page)})


@dataclass(frozen=True)
class Prediction:
    """One image's classification: the best class and its calibrated probability, how far to trust it (the
    normalised entropy, the margin between the two best classes, the flag: ok, uncertain or
    unlike-training; trust.py), every class's probability, the k best, and the model that answered."""

    class_id: int = answer("the id of the most probable class (its class folder's position)")
    class_name: str = answer("the most probable class", line="<{class_width}", heading="class")
    confidence: float = answer("its calibrated probability", line=">6.1%", heading="conf")
    entropy: float = answer("the normalised entropy of the probabilities: 0 certain, 1 uniform",
                            line=">7.3f", heading="entropy", page="entropy (0 certain, 1 uniform)")
    margin: float = answer("the gap between the two most probable classes' probabilities",
                           line=">6.3f", heading="margin", page="margin over the next class")
    flag: str = answer("how far to trust the answer: ok, uncertain (confidence under --min-confidence) or "
                       "unlike-training (the image lies far from the training images)",
                       line="<15", heading="flag", page="flag")
    bands: str = answer("the bands the image was made from: of a FITS cutout g,r,z (or the two of them it "
                        "holds, or its one band); RGB or grey for other images", line="<8", heading="bands",
                        page="bands")
    probabilities: tuple[float, ...]  # by class id; they sum to 1
    class_names: tuple[str, ...]
    model: str  # the checkpoint's file name
    top_k: tuple[tuple[int, str, float], ...]  # (class_id, class_name, probability), most probable first
    embedding: tuple[float, ...] | None = None  # the penultimate features, where asked for

    @classmethod
    def of(cls, probs: torch.Tensor, class_names: Sequence[str], model: str, top_k: int | None = None,
           unlike: bool | None = None, min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE,
           embedding: torch.Tensor | None = None, bands: str = "RGB") -> Prediction:
        """The prediction of one image's calibrated probabilities (C,), whether it lies unlike the training
        images (None: the model cannot tell) and the bands it was made from (images.bands_of)."""
        values = tuple(float(p) for p in probs.double())
        order = sorted(range(len(values)), key=lambda i: -values[i])[: top_k_count(top_k, len(values))]
        best = order[0]
        return cls(
            class_id=best,
            class_name=class_names[best],
            confidence=values[best],
            entropy=float(trust.entropy(probs.double())),
            margin=float(trust.margin(probs.double())),
            flag=trust.flag(values[best], unlike, min_confidence),
            bands=bands,
            probabilities=values,
            class_names=tuple(class_names),
            model=model,
            top_k=tuple((i, class_names[i], values[i]) for i in order),
            embedding=None if embedding is None else tuple(embedding.tolist()),
        )

    def answers(self) -> dict[str, Any]:
        """The answer fields by name, in order: what every output carries."""
        return {name: getattr(self, name) for name in ANSWERS}

    def page_facts(self) -> list[tuple[str, str]]:
        """(label, value) for the answer fields the result page lists as facts."""
        return [(how.page, format_value(getattr(self, name)))
                for name, (_, how) in ANSWERS.items() if how.page]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the answers, every class's probability, the model and the k best."""
        return {**self.answers(), "probabilities": list(self.probabilities),
                "class_names": list(self.class_names), "model": self.model,
                "top_k": [{"class_id": i, "class_name": name, "probability": p} for i, name, p in self.top_k]}


# name -> (Python type, how it is shown), in Prediction's order: what every output derives from.
ANSWERS: dict[str, tuple[type, Answer]] = {
    f.name: (ANSWER_TYPES[str(f.type)], f.metadata["answer"])
    for f in dataclasses.fields(Prediction) if "answer" in f.metadata
}


def format_value(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def top_k_count(top_k: int | None, num_classes: int) -> int:
    if top_k is None:
        return num_classes
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    return min(top_k, num_classes)


class ResultLines:
    """The command line's fixed-width lines: the input's name, the answer fields that have a line format,
    then the k best classes."""

    def __init__(self, names: Iterable[str], class_names: Sequence[str]) -> None:
        widths = {"class_width": max(len(c) for c in class_names)}
        self.path_width = min(max((len(n) for n in names), default=4), 60)
        self.columns = [(name, how.heading, how.line.format(**widths))
                        for name, (_, how) in ANSWERS.items() if how.line]

    def header(self) -> str:
        cells = [f"{heading:{_align(spec)}{_width(spec)}}" for _, heading, spec in self.columns]
        return "  ".join([f"{'path':<{self.path_width}}", *cells, "top-k"])

    def row(self, name: str, prediction: Prediction) -> str:
        cells = [f"{getattr(prediction, field_name):{spec}}" for field_name, _, spec in self.columns]
        best = ", ".join(f"{class_name} {p:.1%}" for _, class_name, p in prediction.top_k)
        return "  ".join([f"{name:<{self.path_width}}", *cells, best])


def _align(spec: str) -> str:
    return spec[0] if spec[:1] in "<>^" else ">"


def _width(spec: str) -> str:
    digits = "".join(c for c in spec.lstrip("<>^").split(".")[0] if c.isdigit())
    return digits
