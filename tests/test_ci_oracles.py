"""The conftest hook that makes CI fail when a test oracle (torch, transformers) is missing.

Each test runs pytest in a subprocess on generated test files whose conftest loads this suite's
conftest hooks; "missing" is simulated with sys.modules[name] = None, which makes importing it
fail exactly as importorskip sees an absent package.
"""
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")

TESTS = '''
import sys
import pytest


def test_torch_missing():
    sys.modules["torch"] = None
    try:
        pytest.importorskip("torch")
    finally:
        del sys.modules["torch"]


def test_transformers_missing():
    sys.modules["transformers"] = None
    try:
        pytest.importorskip("transformers")
    finally:
        del sys.modules["transformers"]


@pytest.fixture
def oracle_in_fixture():
    sys.modules["torch"] = None
    try:
        pytest.importorskip("torch")
    finally:
        del sys.modules["torch"]


def test_torch_missing_in_a_fixture(oracle_in_fixture):
    pass


def test_bench_assets_absent():
    pytest.skip("benchmark assets (../shared/bench) are not available")


def test_other_package_missing():
    pytest.importorskip("hiquant_no_such_package")


def test_passes():
    pass
'''


def run_pytest(folder, files, env_updates):
    """Runs pytest on files (name → source) in folder; returns (exit code, output, outcome by test)."""
    (folder / "conftest.py").write_text(textwrap.dedent(f'''
        import importlib.util
        _spec = importlib.util.spec_from_file_location("hiquant_tests_conftest", {CONFTEST!r})
        _suite = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_suite)
        pytest_runtest_makereport = _suite.pytest_runtest_makereport
        pytest_make_collect_report = _suite.pytest_make_collect_report
    '''))
    (folder / "pytest.ini").write_text("[pytest]\n")
    for name, source in files.items():
        (folder / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HIQUANT_REQUIRE_ORACLES")}
    env.update(env_updates)
    xml = folder / "results.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *files], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return proc.returncode, proc.stdout, outcomes


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    return run_pytest(tmp_path_factory.mktemp("ci"), {"test_gen.py": TESTS}, {"CI": "true"})


def test_missing_oracle_fails_the_run_under_ci_and_names_the_oracle(ci_run):
    rc, out, outcomes = ci_run
    assert rc == 1, out
    assert outcomes["test_torch_missing"] == "failure", out
    assert outcomes["test_transformers_missing"] == "failure", out
    assert outcomes["test_torch_missing_in_a_fixture"] == "error", out
    assert "the test oracle 'torch' is missing" in out
    assert "the test oracle 'transformers' is missing" in out
    assert "make oracles" in out


def test_skips_that_are_not_oracles_stay_skips_under_ci(ci_run):
    rc, out, outcomes = ci_run
    assert outcomes["test_bench_assets_absent"] == "skipped", out
    assert outcomes["test_other_package_missing"] == "skipped", out
    assert outcomes["test_passes"] == "passed", out


@pytest.mark.parametrize("env", [{}, {"CI": "false"}, {"CI": "true", "HIQUANT_REQUIRE_ORACLES": "0"}])
def test_missing_oracle_only_skips_outside_ci(tmp_path, env):
    rc, out, outcomes = run_pytest(tmp_path, {"test_gen.py": TESTS}, env)
    assert rc == 0, out
    assert outcomes["test_torch_missing"] == "skipped", out
    assert outcomes["test_torch_missing_in_a_fixture"] == "skipped", out


def test_module_level_oracle_skip_fails_collection_under_ci(tmp_path):
    module = 'import sys\nimport pytest\nsys.modules["torch"] = None\n' \
             'torch = pytest.importorskip("torch")\n\n\ndef test_uses_torch():\n    pass\n'
    rc, out, _ = run_pytest(tmp_path, {"test_mod.py": module}, {"CI": "true"})
    assert rc != 0, out
    assert "the test oracle 'torch' is missing" in out
    rc, out, _ = run_pytest(tmp_path, {"test_mod.py": module}, {})
    assert rc == 5 and "1 skipped" in out, out  # 5: pytest ran no test
