"""The streaming service inside the current process, for one-shot and interactive use.

    from gdsllm.service.pipeline import LocalService, generate_once
    final = generate_once(config, "Once upon a time", {"max_tokens": 32, "temperature": 0},
                          on_text=lambda d: print(d, end=""))           # what `gdsllm generate` runs
    with LocalService(config) as svc:                                   # what `gdsllm run` runs
        with Client(svc.endpoint) as c: ...

LocalService runs a Coordinator (the same I/O and compute worker processes as `gdsllm serve`) on
its own uvloop in a background thread, bound to a private `ipc://` endpoint in a 0700 temp dir
unless the config names one, and shuts everything down on exit: workers, shared memory, sockets,
also when Ctrl-C or SIGTERM (which `gdsllm` turns into SystemExit) interrupts its start-up.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

from ipc import sockets

from gdsllm.config import ServiceConfig

log = logging.getLogger("gdsllm.service.pipeline")


class LocalService:
    def __init__(self, config: ServiceConfig, private_endpoint: bool = True, **coordinator_kwargs):
        self.dir = sockets.EndpointDir() if private_endpoint else None
        if self.dir is not None:
            config = dataclasses.replace(config, endpoint=self.dir.endpoint("service"), metrics_port=None)
        self.config, self.kwargs = config, coordinator_kwargs
        self.endpoint = config.endpoint
        self.coordinator = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stop_requested = False
        self._thread = threading.Thread(target=self._main, name="gdsllm-service", daemon=True)

    def start(self) -> "LocalService":
        """Start the service and wait until it serves. Interrupted (Ctrl-C, SIGTERM) or failed,
        it first undoes what had started, then raises."""
        self._thread.start()
        try:
            self._ready.wait()
        except BaseException:
            self.stop()
            raise
        if self._error is not None:
            self._join()
            self._cleanup()
            raise self._error
        return self

    def _main(self) -> None:
        import uvloop
        self._loop = uvloop.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from gdsllm.service.coordinator import Coordinator
        self._task = asyncio.current_task()
        try:
            if self._stop_requested:
                raise asyncio.CancelledError
            self.coordinator = c = Coordinator(self.config, **self.kwargs)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        try:
            await c.start()
        except BaseException as e:  # CancelledError too: stop() during start-up
            if isinstance(e, asyncio.CancelledError):
                self._task.uncancel()  # the close below must still be able to wait
            self._error = e
        self._ready.set()
        try:
            if self._error is None:
                await c.serve()
        finally:
            await c.close()

    def _stop_in_loop(self) -> None:
        if self._ready.is_set():
            if self.coordinator is not None:
                self.coordinator.request_stop()
        elif self._task is not None:
            self._task.cancel()  # still starting: abandon the start-up, then close

    def stop(self) -> None:
        """Shut the service down and wait for it (workers joined, shm unlinked, sockets removed)."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(self._stop_in_loop)
            except RuntimeError:
                pass  # the loop has just closed: the thread is ending by itself
        self._join()
        self._cleanup()

    def _join(self) -> None:
        """Wait for the service thread; a second Ctrl-C or SIGTERM does not cut the clean-up short
        (it is bounded: workers that ignore Shutdown are killed after STOP_TIMEOUT_S)."""
        if self._thread.ident is None:
            return
        while self._thread.is_alive():
            try:
                self._thread.join()
            except (KeyboardInterrupt, SystemExit):
                log.warning("still shutting the service down (workers, shared memory, sockets)")

    def _cleanup(self) -> None:
        if self.dir is not None:
            self.dir.close()

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def generate_once(config: ServiceConfig, prompt: str | None = None, params: dict | None = None, *,
                  messages: list[dict] | None = None, on_text=None, timeout: float = 3600.0):
    """Run the service for one request and shut it down; returns the Final message.

    `params`: Generate fields (max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos).
    `on_text(delta)` is called with the text as it streams.
    """
    from gdsllm.service.client import Client
    with LocalService(config) as svc, Client(svc.endpoint, timeout=timeout) as client:
        final = None
        for msg in client.stream_messages(prompt, messages=messages, **(params or {})):
            if getattr(msg, "finish_reason", None) is not None:
                final = msg
            elif msg.text and on_text is not None:
                on_text(msg.text)
        return final


def check_prompt(model, prompt: str | None, messages: list[dict] | None, where: str) -> int:
    """The token count of a request's prompt, checked as the service would check it (ValueError
    naming `where`: a chat request to a model without a chat template, a prompt that leaves no
    room in the model's context), in a fraction of a second and before any worker starts."""
    from gdsllm.engine.sequence import prompt_ids
    from gdsllm.engine.tokenizer import Tokenizer
    from gdsllm.format.metadata import load_model_meta
    meta = load_model_meta(model)
    tok = Tokenizer(meta) if meta.tokenizer_file else None
    return len(prompt_ids(messages if messages is not None else prompt, tok, meta.params, where))


def check_endpoint_free(endpoint: str) -> None:
    """OSError naming `endpoint` when its tcp:// address cannot be bound (another server has the
    port), said before any worker starts or any other address is announced. An ipc:// path is
    not tried: binding one takes it over from whoever has it."""
    if not endpoint.startswith("tcp://"):
        return
    import zmq
    ctx = zmq.Context()
    try:
        sockets.router(ctx, endpoint).close(linger=0)
    finally:
        ctx.term()
