"""``POST /v1/watermark/detect {text, model}``: is this text watermarked by one of our keys?"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.asgi import read_body
from gateway.errors import InvalidRequest, ModelNotFound, NotFound
from gateway.schemas import parse_json_model
from gateway.watermark.detector import WatermarkDetector


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr
    model: StrictStr | None = None


class WatermarkEndpoint:
    """``POST /v1/watermark/detect``: is this text watermarked by one of our keys?"""

    def __init__(self, detector: WatermarkDetector | None, max_body_bytes: int) -> None:
        self._detector = detector
        self._max_body_bytes = max_body_bytes

    async def detect(self, request: Request) -> Response:
        detector = self._detector
        if detector is None:
            raise NotFound(
                "Watermark detection is not enabled on this gateway (watermark.enabled).",
                code="watermark_disabled",
            )
        raw = await read_body(request.scope, request.receive, self._max_body_bytes)
        spec = parse_json_model(raw, DetectRequest)
        model = self._model(detector, spec.model)
        found, tokens = await detector.score_texts(model, [spec.text], in_thread=True)
        return JSONResponse(
            {
                "object": "watermark.detection",
                "model": model,
                "watermarked": found.watermarked,
                "z_score": found.z_score,
                "p_value": found.p_value,
                "tokens": tokens,
                "scored": found.scored,
                "green": found.green,
                "key_id": found.key_id if found.watermarked else None,
            }
        )

    @staticmethod
    def _model(detector: WatermarkDetector, model: str | None) -> str:
        models = detector.models()
        if model is None:
            if len(models) == 1:
                return models[0]
            raise InvalidRequest(
                "'model' is required: choose one of the models with a tokenizer "
                f"({', '.join(models) or 'none configured'}).",
                param="model",
            )
        if model not in models:
            raise ModelNotFound(
                f"The model '{model}' has no tokenizer for watermark detection "
                "(watermark.tokenizers).",
                param="model",
            )
        return model
