"""`prefq serve`: the playground's generation service (`serve.app`) and its model processes (`serve.pool`).
Torch-free, like the worker; it imports neither the API nor the worker."""
