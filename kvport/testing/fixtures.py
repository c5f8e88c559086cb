"""The kit's fixtures and its parametrization (`pytest_generate_tests`).

They live in the collected module (suite.py star-imports them), not in the pytest11 plugin,
so a project that does not run the kit never sees them.
"""
from __future__ import annotations

import pytest

from kvport.testing.target import KitTarget, kit_options, resolve_target

__all__ = ["kit_target", "kit_torch_target", "kit_model", "kit_dtype", "kit_seed",
           "pytest_generate_tests"]

UNRESOLVED = "<device not checkable>"


@pytest.fixture(scope="module")
def kit_target(request) -> KitTarget:
    """The platform under test; fails (with the registry's reason) when it cannot run here."""
    options = kit_options(request.config, request.module)
    return resolve_target(request.config, options.device,
                          options.foreign_backends).require()


@pytest.fixture(scope="module")
def kit_torch_target(kit_target) -> KitTarget:
    """The target, for the checks that need torch: skipped on a platform of another
    framework, whose platform and end-to-end checks still run."""
    if kit_target.framework != "torch":
        pytest.skip(f"platform {kit_target.name!r} is a {kit_target.framework} platform; the "
                    "kit's attention checks are torch-based (its end-to-end checks cover it)")
    return kit_target


@pytest.fixture(scope="module")
def kit_seed(request) -> int:
    """This run's seed: fresh each run, fixed with --kvport-seed to reproduce a failure."""
    return kit_options(request.config, request.module).seed


@pytest.fixture(scope="module")
def kit_model(tmp_path_factory, kit_seed):
    """The tiny random-weight Llama checkpoint, built once per module."""
    from kvport.testing.tiny_model import build_tiny_llama
    return build_tiny_llama(str(tmp_path_factory.mktemp("kvport-kit-llama")), seed=kit_seed)


@pytest.fixture(scope="module")
def kit_dtype(kit_target) -> str:
    """float32 when the platform has it (exact comparisons), else its preferred dtype."""
    dtypes = tuple(kit_target.platform.supported_dtypes())
    return "float32" if "float32" in dtypes else dtypes[0]


# ------------------------------------------------------------------ parametrization

def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per attention backend (`kit_backend`) or per backend and grid case
    (`kit_attention_case`), for the backends registered for the device under test."""
    wanted = {"kit_backend", "kit_attention_case"} & set(metafunc.fixturenames)
    if not wanted:
        return
    options = kit_options(metafunc.config, metafunc.module)
    target = resolve_target(metafunc.config, options.device, options.foreign_backends)
    if target.error is not None:
        for name in wanted:   # the target fixture reports why
            metafunc.parametrize(name, [UNRESOLVED], ids=["no-device"])
        return
    backends = _backends(target, options.backends, options.foreign_backends)
    if "kit_backend" in wanted:
        metafunc.parametrize("kit_backend", [_param(reg, target, reg.name) for reg in backends])
    if "kit_attention_case" in wanted:
        from kvport.testing.attention_cases import attention_grid
        dtypes = _grid_dtypes(target, options.full_grid)
        params = []
        for reg in backends:
            for case in attention_grid(dtypes, options.full_grid):
                params.append(_param(reg, target, f"{reg.name}-{case.id}", case))
        metafunc.parametrize("kit_attention_case", params)


def _backends(target: KitTarget, names: tuple[str, ...], foreign: tuple[str, ...] = ()) -> list:
    """The backends to check: those named (default: all of the device's), plus the foreign
    ones; with foreign ones and no names, only the foreign ones."""
    registered = target.attention_backends()
    if foreign:
        names = tuple(dict.fromkeys(names + foreign))
    if not names:
        return [reg for reg in registered if reg.name != "torch_reference"] or registered
    unknown = sorted(set(names) - {reg.name for reg in registered})
    if unknown:
        raise pytest.UsageError(
            f"--kvport-backend {', '.join(unknown)}: not registered for device "
            f"{target.device!r}; registered: {', '.join(r.name for r in registered)}")
    return [reg for reg in registered if reg.name in names]


def _param(reg, target: KitTarget, test_id: str, case=None):
    value = reg.name if case is None else (reg.name, case)
    if reg.framework != "torch" or target.framework != "torch":
        reason = (f"attention backend {reg.name!r} is a {reg.framework} backend on a "
                  f"{target.framework} platform; the kit's backend checks are torch-based, "
                  "its end-to-end checks cover it")
        return pytest.param(value, id=test_id, marks=pytest.mark.skip(reason=reason))
    return pytest.param(value, id=test_id)


def _grid_dtypes(target: KitTarget, full: bool) -> tuple[str, ...]:
    """float32 plus the platform's preferred low-precision dtype (all of them: full grid)."""
    supported = tuple(target.platform.supported_dtypes())
    if full:
        return supported
    low = [d for d in supported if d != "float32"][:1]
    return tuple(dict.fromkeys((["float32"] if "float32" in supported else []) + low))
