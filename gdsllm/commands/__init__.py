"""One module per `gdsllm` sub-command; each has `add_parser(sub)` (see gdsllm.cli)."""
