"""The JSON bodies of ``tinycifar serve``'s API, as the OpenAPI description states them.

They document the answers; the handlers still return plain dicts, so nothing is filtered or
added on the way out. That makes the description checkable: the fuzz test (Schemathesis)
validates every real answer against these models, and a handler that drifts from them fails it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Described(BaseModel):
    """No key beyond the described ones (``additionalProperties: false``): an answer that grows a
    key the description does not have fails the schema checks instead of passing unnoticed."""

    model_config = ConfigDict(extra="forbid")


class Error(Described):
    """Any refusal: unknown model, no test set or image, an upload over the size limit."""

    detail: str


class FileError(Described):
    filename: str
    error: str = Field(description="starts with the file name, then what is wrong with it")


class UnusableUploads(Error):
    """400 of /api/predict: no uploaded file was a usable image, or the body was no multipart form."""

    errors: list[FileError] = Field(default_factory=list, description="each unusable file (absent when the "
                                                                       "body itself could not be parsed)")


class ClassProbability(Described):
    label: str
    index: int
    prob: float


class Prediction(Described):
    filename: str
    top: list[ClassProbability] = Field(description="the most probable classes, most probable first")
    input_png: str = Field(description="the network's input as a base64 PNG")
    gradcam_png: str | None = Field(None, description="with gradcam=true only: the Grad-CAM map as a base64 PNG")
    true_label: str | None = Field(None, description="/api/predict-test only")


class Predictions(Described):
    model: str
    results: list[Prediction]
    errors: list[FileError] = Field(description="the uploads that were no usable image; the others are answered")


class Health(Described):
    status: Literal["ok"]
    models: list[str]


class ModelEntry(Described):
    name: str
    network: str
    test_accuracy: float | None


class GalleryItem(Described):
    index: int
    label: str
    png: str
    predicted: str
    prob: float


class Gallery(Described):
    model: str
    view: Literal["test", "mistakes"]
    total: int
    offset: int
    items: list[GalleryItem]


class Epoch(Described):
    epoch: int
    train_loss: float | None
    test_loss: float | None
    train_acc: float | None
    test_acc: float | None


class ModelCard(Described):
    name: str
    network: str
    params: int
    macs: int
    receptive_field: int
    checkpoint: str
    epoch: int | None
    preset: str | None
    dataset: str
    engine: str
    gradcam_layer: str
    classes: list[str]
    test_accuracy: float | None
    per_class_accuracy: dict[str, float] | None
    test_set: str = Field(description="how many test images, or why there are none")
    history: list[Epoch]


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries of the refusals an operation can answer besides 422."""
    described = {
        400: (UnusableUploads, "no uploaded file is a usable image (each is named in errors), or the body "
                               "is no valid multipart form"),
        404: (Error, "unknown model, or no test set / no such test image"),
        413: (Error, "the request is larger than --max-upload-mb"),
    }
    return {code: {"model": described[code][0], "description": described[code][1]} for code in codes}
