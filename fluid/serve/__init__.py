"""``python -m fluid.serve``: a FLUID model behind an OpenAI-compatible API, with continuous
batching (:mod:`fluid.serve.engine`) and streaming (:mod:`fluid.serve.app`); docs/serving.md."""

from __future__ import annotations

from typing import Any, Mapping


def build_server(checkpoint, decode: Mapping[str, Any] | None = None, *, model_name: str | None = None,
                 device: str = "auto", dtype: str = "float32", mask_token_id: int | None = None,
                 stop_strings=(), max_rows: int = 16, max_queue: int = 256, max_tokens: int = 1024,
                 default_max_tokens: int | None = None, context: int | None = None,
                 max_body_bytes: int = 1 << 20):
    """``(app, engine)``: the FastAPI app over a started engine for ``checkpoint``."""
    from pathlib import Path

    from fluid.decoding.setup import build_decoder
    from fluid.serve.app import Limits, create_app
    from fluid.serve.engine import Engine
    from fluid.serve.metrics import Metrics
    from fluid.utils.errors import FluidConfigError

    for key, v, lo in (("max_rows", max_rows, 1), ("max_queue", max_queue, 1), ("max_tokens", max_tokens, 1),
                       ("max_body_bytes", max_body_bytes, 1024)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise FluidConfigError(key, f"must be an integer >= {lo}, got {v!r}")
    fm, dec = build_decoder(checkpoint, decode, device=device, dtype=dtype, mask_token_id=mask_token_id)
    ctx = context or getattr(fm.model.config, "max_position_embeddings", None) or 2048
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise FluidConfigError("context", f"must be an integer >= 2, got {ctx!r}")
    engine = Engine(dec, max_rows=max_rows, max_queue=max_queue, metrics=Metrics()).start()
    name = model_name or Path(str(checkpoint)).resolve().name
    limits = Limits(max_tokens=max_tokens, default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes,
                    context=ctx)
    app = create_app(engine, fm.tokenizer, name, limits, fm.model.get_input_embeddings().num_embeddings,
                     list(stop_strings))
    return app, engine
