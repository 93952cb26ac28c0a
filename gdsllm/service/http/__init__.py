"""The OpenAI-compatible HTTP API and the chat page: one more client of the coordinator.

    gdsllm serve --http-port 8000 [--http-host 127.0.0.1] [--api-key-file FILE]
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'     # without the type: 415

openai.py (request rules, response shapes, errors), sse.py (event framing), frontend.py (the
ZeroMQ AsyncClient link), app.py (routes, body limits, the Guard: Host, Origin, JSON, keys and
callers; metrics), server.py (uvicorn in the coordinator's loop, the request-head deadline),
client.py (`--endpoint http://` for generate and run), static/ (the page).
"""
