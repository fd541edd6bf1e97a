"""Placeholder until the service issue: `lorad service` is not built yet."""


def main(settings, args) -> int:
    print("lorad service: not implemented yet")
    return 1
