"""The `prefq` command: client commands over HTTP, the launchers of prefq's processes, `dev`/`demo` and the
embedded stack that tests and benches use too. It may import anything of prefq's; nothing of prefq imports it."""
