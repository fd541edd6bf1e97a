"""Placeholder until the engine issue lands `lorad selftest`."""


def run_selftest(keep: bool = False) -> int:
    print("lorad selftest: not implemented yet")
    return 1
