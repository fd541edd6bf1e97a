"""lorad's open-file limit: the target it raises to, and the service files that raise it."""

from __future__ import annotations

import resource

import pytest


@pytest.mark.parametrize(
    "soft, hard, platform, target",
    [(256, 256, "linux", None), (256, 4096, "linux", 4096), (1024, 524288, "linux", 524288),
     (256, resource.RLIM_INFINITY, "darwin", 10240), (256, resource.RLIM_INFINITY, "linux", 1048576),
     (4096, 1024, "linux", None), (20000, 20000, "linux", None)],
)  # fmt: skip
def test_file_limit_target(soft, hard, platform, target):
    from daemon.daemon import file_limit_target

    assert file_limit_target(soft, hard, platform) == target


def test_service_files_raise_the_file_limit(tmp_path):
    from daemon import service
    from daemon.settings import resolve

    settings = resolve(env={"LORAD_ASSETS": str(tmp_path / "assets")})
    paths = service.paths_for(settings, home=tmp_path)
    plist = service.render_launchd(settings, paths)
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 4096
    unit = service.render_systemd(settings, paths)
    assert "\nLimitNOFILE=" in unit
    worker = service.paths_for(settings, home=tmp_path, worker=True, queue="redis://h:6379/0")
    assert "\nLimitNOFILE=" in service.render_systemd(settings, worker)
    assert service.render_launchd(settings, worker)["SoftResourceLimits"]["NumberOfFiles"] >= 4096


@pytest.mark.parametrize("limit", [16, 64, 256, 1024, 20000, -1])
def test_the_dashboard_keeps_within_half_the_file_limit_under_a_reconnecting_flood(limit):
    """Open connections, plus three loop ticks of accepted sockets not yet closed (an over-cap one is
    answered 503 and closed a tick or two after asyncio accepted it, in batches of `accept_batch`)."""
    from daemon.ui.server import connection_caps

    caps = connection_caps(limit)
    effective = limit if limit > 0 else 1 << 20
    assert caps.connections <= max(4, effective // 4) and caps.streams <= caps.connections
    assert 2 <= caps.accept_batch <= max(2, caps.connections // 8)
    if effective >= 64:
        assert caps.connections + 3 * caps.accept_batch <= effective // 2
