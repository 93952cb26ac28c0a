"""The OpenAI-compatible HTTP API and the chat page: one more client of the coordinator.

    gdsllm serve --http-port 8000 [--http-host 127.0.0.1] [--api-key KEY]
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

openai.py (request rules, response shapes, errors), sse.py (event framing), frontend.py (the
ZeroMQ AsyncClient link), app.py (routes, key check, metrics), server.py (uvicorn in the
coordinator's loop), client.py (`--endpoint http://` for generate and run), static/ (the page).
"""
