"""Layers a test enforces (issue 21 item 4): lorad's import graph, read with `ast` from every module
under lorad_base/, engines/ and daemon/ (function-level imports included; tests/import_graph.py),
has no import circle, no engines -> daemon import, and at most one import of a higher layer by a
lower one.

Why layers: a lower floor must be usable (and testable) without the floors above it. An engine
runs in a child process and on workers that have no daemon; the CLI's `lorad status` must start
without the job loop; the dashboard and the CLI share actions that neither of them owns. Lazy
imports used to hide the circle commands -> daemon -> ui/server -> ui/app -> commands; counting
them here keeps such a circle from growing back unseen.
"""

from __future__ import annotations

from pathlib import Path

import import_graph as ig
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lorad_base", "engines", "daemon")

# The declared order, ground floor first. A module sits on the layer of its longest matching
# prefix; it may import its own layer and the ones below. Add a new module where it belongs
# (the test names a module that is on no layer).
LAYERS = (
    ig.Layer(
        "base: utilities both sides use (atomic files, logs, safetensors, locks, child env)", ("lorad_base",)
    ),
    ig.Layer(
        "contract: the engine contract and the job states (pure)",
        ("engines.base", "daemon.states"),
        exact=("engines", "daemon"),  # the packages' __init__ (daemon's holds __version__)
    ),
    ig.Layer("engines: implementations behind the contract (never the daemon)", ("engines",)),
    ig.Layer(
        "core: settings, the daemon's names for the base utilities, pure rules",
        (
            "daemon.settings",
            "daemon.fsutil",
            "daemon.logs",
            "daemon.lock",
            "daemon.childenv",
            "daemon.safetensors_file",
            "daemon.caption_model",
            "daemon.metrics",
            "daemon.sample",
            "daemon.logview",
            "daemon.intake.findings",
            "daemon.intake.contract",
            "daemon.intake.metadata",
            "daemon.intake.options",
            "daemon.remote.lease",
            "daemon.remote.redisurl",
            "daemon.effective",
            "daemon.estimate",
        ),
        exact=("daemon.intake", "daemon.remote", "daemon.ui"),
    ),
    ig.Layer(
        "records: the jobs table, queue, markers, registry, publishing, engines built for this machine",
        (
            "daemon.jobs",
            "daemon.jobrecord",
            "daemon.intake.markers",
            "daemon.queue",
            "daemon.status",
            "daemon.registry",
            "daemon.publish",
            "daemon.publisher",
            "daemon.space",
            "daemon.notify",
            "daemon.engine_host",
            "daemon.remote.transfer",
            "daemon.remote.messages",
            "daemon.remote.redisqueue",
            "daemon.retention",
        ),
    ),
    ig.Layer(
        "intake: validation, snapshot, captioning, the watcher",
        (
            "daemon.intake.validate",
            "daemon.intake.images",
            "daemon.intake.caption_sources",
            "daemon.intake.snapshot",
            "daemon.intake.take",
            "daemon.captions",
            "daemon.watch",
        ),
    ),
    ig.Layer(
        "running jobs: the pipeline, the Redis worker and coordinator, checks",
        (
            "daemon.runner",
            "daemon.pipeline",
            "daemon.remote.worker",
            "daemon.remote.coordinator",
            "daemon.selftest",
        ),
    ),
    ig.Layer(
        "what a user can do to a job, and how a job reads on a page", ("daemon.actions", "daemon.ui.views")
    ),
    ig.Layer(
        "surfaces: the daemon process, the dashboard, the OS service, doctor (which reads the service's paths)",
        ("daemon.daemon", "daemon.ui.app", "daemon.ui.server", "daemon.service", "daemon.doctor"),
    ),
    ig.Layer("the CLI", ("daemon.commands", "daemon.cli")),
)
MAX_UPWARD = 1  # issue 21: at most one upward edge, and it should have a reason


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return ig.graph(ROOT, PACKAGES)


def test_every_module_is_on_a_declared_layer(edges):
    for module in edges:
        ig.layer_of(module, LAYERS)  # raises, naming the module, when it is on none


def test_no_import_circle(edges):
    assert ig.circles(edges) == []


def test_no_engine_imports_the_daemon(edges):
    assert ig.crossings(edges, "engines", "daemon") == []


def test_the_base_layer_imports_neither_daemon_nor_engines(edges):
    assert ig.crossings(edges, "lorad_base", "daemon") + ig.crossings(edges, "lorad_base", "engines") == []


def test_at_most_one_upward_edge(edges):
    assert len(ig.upward_edges(edges, LAYERS)) <= MAX_UPWARD, ig.upward_edges(edges, LAYERS)


# -- the checker itself, on planted violations ---------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SMALL_LAYERS = (ig.Layer("low", ("pkg.low",)), ig.Layer("high", ("pkg", "pkg.high")))


def test_a_clean_tree_passes(tmp_path):
    root = _tree(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/low.py": "import os\n", "pkg/high.py": "from pkg import low\n"},
    )
    edges = ig.graph(root, ("pkg",))
    assert edges["pkg.high"] == {"pkg.low"}
    assert ig.circles(edges) == [] and ig.upward_edges(edges, SMALL_LAYERS) == []


def test_a_planted_circle_through_a_function_level_import_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "x = 1\ndef f():\n    from . import c\n",
            "pkg/c.py": "def g():\n    import pkg.a\n",
        },
    )
    assert ig.circles(ig.graph(root, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_planted_upward_edge_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "def f():\n    from .high import thing\n",
            "pkg/high.py": "thing = 1\n",
        },
    )
    assert ig.upward_edges(ig.graph(root, ("pkg",)), SMALL_LAYERS) == [("pkg.low", "pkg.high")]


def test_a_planted_engine_importing_the_daemon_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "engines/__init__.py": "",
            "engines/x/__init__.py": "",
            "engines/x/engine.py": "def f():\n    from daemon import fsutil\n",
            "daemon/__init__.py": "",
            "daemon/fsutil.py": "",
        },
    )
    edges = ig.graph(root, ("engines", "daemon"))
    assert ig.crossings(edges, "engines", "daemon") == [("engines.x.engine", "daemon.fsutil")]


def test_a_module_on_no_layer_is_named(tmp_path):
    with pytest.raises(LookupError, match="other.mod"):
        ig.layer_of("other.mod", SMALL_LAYERS)
