"""The on-disk weight format: metadata (describe and validate), the writer, and the readers that move unit bytes from storage into buffers."""
