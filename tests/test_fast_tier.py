"""The fast tier's own check (tests/_fast_tier.py): a package whose only tests are slow stops a
fast-tier run by name; the same project with a fast test of it runs."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project(tmp_path):
    """pkg (a module util) with subpackages a and b; a has a fast test, b only a slow one."""
    for rel in ("pkg/__init__.py", "pkg/util.py", "pkg/a/__init__.py", "pkg/b/__init__.py",
                "pkg/b/mod.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    checks = tmp_path / "checks"
    checks.mkdir()
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntestpaths = checks\nmarkers =\n    slow: slow\n")
    (checks / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path

        sys.path.insert(0, {ROOT!r})
        from tests._fast_tier import check, summary


        def pytest_collection_finish(session):
            check(session, Path(__file__).resolve().parent.parent / "pkg")


        def pytest_terminal_summary(terminalreporter):
            summary(terminalreporter)
        """))
    (checks / "test_a.py").write_text(
        "import pkg.a\nfrom pkg import util\n\n\ndef test_a():\n    assert pkg.a and util\n")
    (checks / "test_b.py").write_text(textwrap.dedent("""
        import pytest


        @pytest.mark.slow
        def test_b():
            from pkg.b import mod
            assert mod
        """))
    return checks


def _pytest(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    return out.returncode, out.stdout + out.stderr


def test_a_package_with_only_slow_tests_stops_the_fast_tier(tmp_path):
    checks = _project(tmp_path)
    rc, out = _pytest(tmp_path, "-m", "not slow")
    assert rc == 1, out
    assert "the fast tier (-m 'not slow') has no test of pkg.b" in out, out
    assert "passed" not in out  # stopped before any test ran
    # Choosing files, or running everything, is not the fast tier: not checked.
    rc, out = _pytest(tmp_path, "-m", "not slow", "checks/test_a.py")
    assert rc == 0 and "1 passed" in out, out
    # A fast test that imports pkg.b (inside the test) covers it.
    (checks / "test_b.py").write_text(
        (checks / "test_b.py").read_text() + "\n\ndef test_b_fast():\n    import pkg.b\n")
    rc, out = _pytest(tmp_path, "-m", "not slow")
    assert rc == 0 and "2 passed, 1 deselected" in out, out
    assert "tests per package: pkg 1, pkg.a 1, pkg.b 1" in out, out
