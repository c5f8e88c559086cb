"""`kvport plugin new`: the generated package installs, is discovered through its entry
point, shows in `kvport plugins --json`, and its own generated tests (the conformance kit)
pass. It is installed with `pip --target` into a temporary directory that only the
subprocesses below see, so nothing changes in the environment of the other tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvport.platforms.scaffold import ScaffoldError, write_plugin
from plugin_fakes import REPO_ROOT


def run(args, cwd, env, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} failed "
                                    f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def test_scaffolded_plugin_installs_is_listed_and_passes_its_conformance_tests(tmp_path):
    out = run([sys.executable, "-m", "kvport.api.cli", "plugin", "new", "demo_dev",
               "--dir", str(tmp_path)], REPO_ROOT, os.environ)
    package = tmp_path / "kvport-demo-dev"
    assert f"created {package}" in out
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--target", str(site), str(package)],
        tmp_path, os.environ)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("KVPORT_PLUGINS", None)

    listed = json.loads(run([sys.executable, "-m", "kvport.api.cli", "plugins", "--json"],
                            tmp_path, env))
    entry = next(p for p in listed["plugins"] if p["plugin"] == "demo_dev")
    assert entry["distribution"] == "kvport-demo-dev" and entry["status"] == "loaded"
    assert entry["api_range"] == ">=1.0,<2"
    assert entry["platforms"][0]["device"] == "demo_dev"
    assert entry["platforms"][0]["available"] is True
    assert entry["attention_backends"] == [{"name": "demo_dev_attention",
                                            "devices": ["demo_dev"], "framework": "torch"}]

    report = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
                 package, env)
    summary = report.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, report
    assert "demo_dev_attention-mixed-h128" in run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        package, env)


@pytest.mark.parametrize("name", ["", "NPU", "9npu", "my-npu", "a b"])
def test_scaffold_refuses_bad_names(tmp_path, name):
    with pytest.raises(ScaffoldError, match="lowercase identifier"):
        write_plugin(name, str(tmp_path))


def test_scaffold_refuses_to_overwrite(tmp_path):
    path = write_plugin("npu", str(tmp_path))
    assert sorted(os.listdir(path)) == ["README.md", "kvport_npu", "pyproject.toml", "tests"]
    plugin = open(os.path.join(path, "kvport_npu", "plugin.py")).read()
    assert 'KVPORT_PLUGIN_API = ">=1.0,<2"' in plugin
    assert 'npu = "kvport_npu.plugin"' in open(os.path.join(path, "pyproject.toml")).read()
    compile(plugin, "plugin.py", "exec")
    for module in ("platform", "worker", "attention"):
        compile(open(os.path.join(path, "kvport_npu", f"{module}.py")).read(), module, "exec")
    with pytest.raises(ScaffoldError, match="already exists"):
        write_plugin("npu", str(tmp_path))
