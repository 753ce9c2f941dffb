"""Pure training: spec in, JSON-lines events out, files in a local folder."""
