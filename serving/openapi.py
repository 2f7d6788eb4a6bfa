"""An OpenAPI 3 description of the public routes, served at `GET /openapi-public.json`.

BentoML's `/docs.json` lists only its own APIs (and those of mounted FastAPI apps): the Starlette routes of
serving.routes are missing from it, so they are described here, with the names of the models loaded at startup.
The document is what the schemathesis tests (tests/test_fuzz.py) generate requests from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.repository import ModelRepository

_ERRORS = {
    400: "no file field `image` (`missing_image`) or an unparsable multipart body (`invalid_multipart`)",
    404: "no such model (`unknown_model`)",
    413: "body over the size limit (`payload_too_large`) or image over the pixel limit (`too_many_pixels`)",
    415: "not multipart/form-data (`unsupported_media_type`)",
    422: "empty, truncated, corrupt or not an image (`invalid_image`)",
    429: "over the per-client rate (`rate_limited`) or the in-flight cap (`over_capacity`); see Retry-After",
    503: "the model is unavailable (`model_unavailable`) or the server is overloaded (`overloaded`)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"}},
            }
        }
    },
}
_BATCH_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "PNG, JPEG or DICOM files, one `image` part each, at most "
                        "IMAGEAI_MAX_IMAGES_PER_REQUEST of them (default 64)",
                    }
                },
            }
        }
    },
}
_MODEL_HEADER = {"model": {"type": "string"}, "version": {"type": "string"}}
_RESULTS = {
    "predict": {
        "type": "object",
        "required": ["model", "version", "label", "confidence"],
        "properties": {
            **_MODEL_HEADER,
            "label": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "threshold": {"type": "number"},
        },
    },
    "proba": {
        "type": "object",
        "required": ["model", "version", "probabilities"],
        "properties": {
            **_MODEL_HEADER,
            "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
    "explain": {
        "type": "object",
        "required": ["model", "version", "label", "confidence", "probabilities", "explanation"],
        "properties": {
            **_MODEL_HEADER,
            "label": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "threshold": {"type": "number"},
            "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
            "explanation": {
                "type": "object",
                "required": ["method", "class", "height", "width", "map"],
                "properties": {
                    "method": {"type": "string"},
                    "layer": {"type": "string"},
                    "class": {"type": "string"},
                    "height": {"type": "integer"},
                    "width": {"type": "integer"},
                    "map": {
                        "type": "array",
                        "description": "height rows of width values in [0, 1], at the model's input resolution",
                        "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                    },
                },
            },
        },
    },
    "encode": {
        "type": "object",
        "required": ["model", "version", "code"],
        "properties": {**_MODEL_HEADER, "code": {"type": "array", "items": {"type": "number"}}},
    },
}


def _batch_result(action: str) -> dict[str, Any]:
    """One result per image, in order: the single-image answer's fields, or an error of that image alone."""
    header_fields = ("model", "version", "threshold")
    single = _RESULTS[action]["properties"]
    per_image = {key: value for key, value in single.items() if key not in header_fields}
    result = {
        "type": "object",
        "required": ["filename"],
        "properties": {
            "filename": {"type": "string", "nullable": True},
            **per_image,
            "error": _ERROR_SCHEMA["properties"]["error"],
        },
    }
    return {
        "type": "object",
        "required": ["model", "version", "results"],
        "properties": {
            **{key: value for key, value in single.items() if key in header_fields},
            "results": {"type": "array", "items": result},
        },
    }


_RESULTS |= {"predict_batch": _batch_result("predict"), "proba_batch": _batch_result("proba")}
_SUMMARIES = {
    "predict": "The label (threshold on the positive class for binary models, else argmax) and its probability",
    "proba": "The probability of every class",
    "explain": "The prediction and the class activation map of the returned label: JSON, or with ?format=png "
    "(or Accept: image/png) a PNG of the map over the image the model saw",
    "reconstruct": "The autoencoder's reconstruction, a PNG at the model's input size",
    "encode": "The autoencoder's code vector",
    "predict_batch": "Several images in one request (repeated `image` parts): the predict answer of each, in order; "
    "an image that cannot be decoded gets its own `error` and does not fail the others",
    "proba_batch": "Several images in one request (repeated `image` parts): the probabilities of each, in order; "
    "an image that cannot be decoded gets its own `error` and does not fail the others",
}


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, description in _ERRORS.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        if status == 404:  # a path no route matches (e.g. a name with a newline) gets BentoML's plain-text 404
            response["content"]["text/plain"] = {"schema": {"type": "string"}}
        responses[str(status)] = response
    return responses


def _operation(action: str, parameter: str, names: list[str]) -> dict[str, Any]:
    png = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    if action == "reconstruct":
        ok = {"description": "PNG", "content": png}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": _RESULTS[action]}}}
    parameters = [
        {
            "name": parameter,
            "in": "path",
            "required": True,
            "description": "a model name from GET /models",
            "schema": {"type": "string", "enum": names} if names else {"type": "string"},
        }
    ]
    responses = {"200": ok, **_error_responses()}
    if action == "explain":
        ok["content"].update(png)
        parameters.append(
            {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["json", "png"]}}
        )
        responses["400"] = {**responses["400"], "description": responses["400"]["description"] + "; `invalid_format`"}
        responses["409"] = {
            "description": "the model was exported without an explanation output (`explanation_unavailable`)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {
        "post": {
            "summary": _SUMMARIES[action],
            "operationId": action,
            "parameters": parameters,
            "requestBody": _BATCH_UPLOAD if action.endswith("_batch") else _UPLOAD,
            "responses": responses,
        }
    }


def openapi_document(repository: ModelRepository) -> dict[str, Any]:
    """The public API, with the model names of this repository as the allowed path values."""
    entries = list(repository)
    classifiers = [entry.name for entry in entries if entry.kind != "autoencoder"]
    autoencoders = [entry.name for entry in entries if entry.kind in ("autoencoder", None)]
    aliases = [name.removesuffix("_autoencoder") for name in autoencoders if name.endswith("_autoencoder")]
    autoencoders = sorted({*autoencoders, *aliases})
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "imageai public API",
            "version": "1",
            "description": "Image classifiers and autoencoders. Every error is JSON {error: {code, message}}.",
        },
        "paths": {
            "/models": {
                "get": {
                    "summary": "Every model: name, version, status, reason, provider, fallback reason and card",
                    "operationId": "models",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["models"],
                                        "properties": {"models": {"type": "array", "items": {"type": "object"}}},
                                    }
                                }
                            },
                        },
                        "429": _error_responses()["429"],
                    },
                }
            },
            "/{model}/predict": _operation("predict", "model", classifiers),
            "/{model}/proba": _operation("proba", "model", classifiers),
            "/{model}/predict/batch": _operation("predict_batch", "model", classifiers),
            "/{model}/proba/batch": _operation("proba_batch", "model", classifiers),
            "/{model}/explain": _operation("explain", "model", classifiers),
            "/{name}/reconstruct": _operation("reconstruct", "name", autoencoders),
            "/{name}/encode": _operation("encode", "name", autoencoders),
        },
        "components": {"schemas": {"Error": _ERROR_SCHEMA}},
    }
