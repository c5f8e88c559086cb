"""The conformance kit itself: it fails a wrong backend with a message naming the shape, it
is inert in pytest runs that do not ask for it, and `--kvport-device` / `kvport plugins
test` select what it checks. (tests/test_plugin_kit_cpu.py runs it for real.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from plugin_fakes import REPO_ROOT

BROKEN_PLUGIN = '''
from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport.platforms.hookspecs import hookimpl

KVPORT_PLUGIN_API = ">=1.0,<2"


class OffByOneShape(TorchReferenceBackend):
    """Right everywhere except head_size 128 with 4 query heads per KV head."""
    name = "broken_ref"

    def forward(self, query, key, value, kv_cache, metadata):
        out = super().forward(query, key, value, kv_cache, metadata)
        if self.spec.head_size == 128 and self.spec.num_queries_per_kv == 4:
            out[-1, :64] += 0.25
        return out


@hookimpl
def kvport_register_attention_backends(register):
    register(name="broken_ref", backend_class="kvbroken_kit:OffByOneShape",
             device_types=("cpu",))
'''


def install_fake(root, module: str, source: str) -> dict:
    """A distribution `kvbroken-kit` in `root`; the returned env puts it on the path."""
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(textwrap.dedent(source))
    info = root / "kvbroken_kit-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvbroken-kit\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kvport]\nbroken = {module}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("KVPORT_PLUGINS", None)
    return env


def run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env or os.environ, capture_output=True,
                          text=True, timeout=600)


def test_a_backend_wrong_on_one_shape_fails_naming_that_shape(tmp_path):
    env = install_fake(tmp_path, "kvbroken_kit", BROKEN_PLUGIN)
    result = run([sys.executable, "-m", "kvport.api.cli", "plugins", "test", "cpu",
                  "--backend", "broken_ref", "--pytest-args", "-k attention_backend"],
                 tmp_path, env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    # CI=true makes pytest append " - message" to each FAILED line: keep the id only
    failed = sorted(line.split("[", 1)[1].split("]", 1)[0] for line in output.splitlines()
                    if line.startswith("FAILED "))
    # Every case of that shape fails, in both dtypes; every other case passes.
    assert failed == ["broken_ref-mixed-h128-gqa4-bs16-bfloat16",
                      "broken_ref-mixed-h128-gqa4-bs16-float32"], output
    assert "attention backend 'broken_ref' differs from torch_reference" in output
    assert "head_size=128, num_heads=8, num_kv_heads=2 (GQA 4), block_size=16" in output
    assert "wrong heads: [0] of 8" in output
    assert "rerun with --kvport-seed" in output
    assert " passed" in output.splitlines()[-1]


def test_kit_is_inert_without_kvport_device(tmp_path):
    (tmp_path / "test_plain.py").write_text(textwrap.dedent('''
        import sys

        def test_nothing_of_the_kit_was_imported():
            assert "kvport.testing.suite" not in sys.modules
            assert "torch" not in sys.modules
    '''))
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_kvport_device_without_paths_collects_the_kit_instead(tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_project():\n    pass\n")
    result = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                  "no:cacheprovider", "--kvport-device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_project" not in result.stdout
    collected = [line.rpartition("::")[2] for line in result.stdout.splitlines() if "::" in line]
    assert "test_memory_queries" in collected
    assert "test_attention_backend_matches_reference[cpu_paged-mixed-h64-gqa1-bs16-float32]" \
        in collected


def test_unknown_device_fails_with_the_registry_message(tmp_path):
    result = run([sys.executable, "-m", "kvport.api.cli", "plugins", "test", "nosuchdev",
                  "--pytest-args", "-k memory_queries"], tmp_path)
    assert result.returncode == 1
    assert "the kit cannot check device 'nosuchdev'" in result.stdout
    assert "no kvport plugin provides device 'nosuchdev'" in result.stdout
