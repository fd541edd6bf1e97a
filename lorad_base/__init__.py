"""lorad's ground floor: utilities the daemon and the engines both use (atomic files, logs, the
safetensors header format, file locks, child-process environments). It imports nothing of
`daemon` or `engines`, so an engine can use it without importing the daemon (tests/unit/test_layers.py
checks this). The old `daemon.<name>` modules stay as aliases of these for daemon/ code."""
