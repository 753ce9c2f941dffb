"""The HTTP API, the CLI and the embedded dev stack. Torch-free."""
