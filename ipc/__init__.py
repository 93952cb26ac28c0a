"""GdsLLM's wire protocol (typed msgpack messages) and shared-memory / CUDA IPC arena handles."""
