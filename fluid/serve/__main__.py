"""``python -m fluid.serve checkpoint=DIR host=127.0.0.1 port=8000`` (conf/serve.yaml)."""

from __future__ import annotations

import logging
import signal

import hydra
from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, register_resolvers
from fluid.decoding.config import register_decode_config
from fluid.utils.errors import FluidConfigError, one_line_errors

register_resolvers()
register_decode_config()
log = logging.getLogger("fluid.serve")


def run(cfg: DictConfig) -> None:
    import uvicorn

    from fluid.serve import build_server
    from fluid.validate import resolve_device, torch_dtype

    resolve_device(cfg.device)
    torch_dtype(cfg.dtype)
    port = cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise FluidConfigError("port", f"must be an integer in 0..65535, got {port!r}")
    app, engine = build_server(
        cfg.checkpoint, OmegaConf.to_container(cfg.decode, resolve=True), model_name=cfg.model_name,
        device=cfg.device, dtype=cfg.dtype, mask_token_id=cfg.mask_token_id, stop_strings=list(cfg.stop_strings),
        max_rows=cfg.max_rows, max_queue=cfg.max_queue, max_tokens=cfg.max_tokens,
        default_max_tokens=cfg.default_max_tokens, context=cfg.context, max_body_bytes=cfg.max_body_bytes)
    dec = engine.rb.cfg
    print(f"fluid.serve: {cfg.checkpoint} on http://{cfg.host}:{port} (algorithm={dec.algorithm}, "
          + (f"window=cost ngram={dec.ngram}" if dec.window == "cost" else f"horizon={dec.horizon}")
          + f", max_rows={cfg.max_rows})", flush=True)
    # uvicorn stops accepting on SIGTERM and waits shutdown_timeout_s for in-flight requests, then
    # raises the signal again under the handler it found: this one, so that a SIGTERM stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=cfg.host, port=port, log_level=cfg.log_level,
                    timeout_graceful_shutdown=cfg.shutdown_timeout_s)
    finally:
        engine.stop()  # what is still queued or running is failed, the engine thread ends
    print("fluid.serve: stopped", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    from fluid.config import run_entry_point

    run_entry_point("serve", _hydra_main)


if __name__ == "__main__":
    main()
