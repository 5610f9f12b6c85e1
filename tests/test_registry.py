"""One registry helper for every plug-in kind, and third-party routers found through entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from molex.core.registry import Registry


def test_duplicate_names_raise_unless_replaced():
    reg: Registry[object] = Registry("widget")
    first, second = object(), object()
    assert reg.register("a", first) is first
    assert reg.register("a", first) is first  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match=r"widget named 'a' is already registered.*replace=True"):
        reg.register("a", second)
    assert reg["a"] is first
    reg.register("a", second, replace=True)
    assert reg["a"] is second


def test_decorator_form_and_mapping_view():
    reg: Registry[object] = Registry("widget")

    @reg.register("f")
    def f():
        return 1

    assert "f" in reg and reg["f"] is f and list(reg) == ["f"] and len(reg) == 1 and sorted(reg) == ["f"]
    with pytest.raises(ValueError, match="needs a non-empty name"):
        reg.register("", f)


def test_unknown_name_lists_the_known_ones_and_how_to_register():
    reg: Registry[int] = Registry("widget", how_to_register="Register yours with reg.register.")
    reg.register("b", 2)
    reg.register("a", 1)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known widgets: a, b\. Register yours"):
        reg.get_or_raise("c")
    with pytest.raises(KeyError):
        reg["c"]


def test_change_listeners_run_after_each_registration():
    reg: Registry[int] = Registry("widget")
    seen: list[int] = []
    reg.on_change(lambda: seen.append(len(reg._entries)))
    reg.register("a", 1)
    reg.register("b", 2)
    assert seen == [1, 2]


def test_every_registry_of_molex_uses_the_helper():
    from molex.allocation.plan import SCHEDULES
    from molex.kernels.grouped_ops import IMPLS
    from molex.kernels.registry import BACKENDS
    from molex.quant.base import SCHEMES
    from molex.routers.base import ROUTERS
    from molex.training.fitters import FITTERS

    for reg in (ROUTERS, BACKENDS, SCHEDULES, SCHEMES, FITTERS, IMPLS):
        assert isinstance(reg, Registry)
        assert len(reg) > 0, reg.kind
    assert {"topk", "dlp"} <= set(ROUTERS) and {"dense", "reference"} <= set(BACKENDS)
    assert "dlp" in FITTERS and {"torch", "triton"} <= set(IMPLS)


def test_one_duplicate_policy_for_routers_and_backends():
    import molex
    from molex.kernels import Backend, register_backend
    from molex.kernels.registry import BACKENDS
    from molex.routers.soft import SoftRouter

    class Impostor(SoftRouter):
        name = "topk"

    with pytest.raises(ValueError, match="router named 'topk' is already registered"):
        molex.register_router(Impostor)
    dense = BACKENDS["dense"]
    with pytest.raises(ValueError, match="kernel backend named 'dense' is already registered"):
        register_backend(Backend(name="dense", fn=dense.fn, description="impostor"))
    assert BACKENDS["dense"] is dense


def test_a_broken_entry_point_warns_and_the_rest_load(tmp_path):
    site = _plugin_site(tmp_path, broken=True)
    code = "import molex; print(molex.available_routers())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env_with(site), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "'halfsoft'" in done.stdout.splitlines()[-1]  # the working plug-in still registered
    assert "router plug-in 'broken' (no_such_module_anywhere" in done.stderr and "ModuleNotFoundError" in done.stderr


def _plugin_site(root: Path, *, broken: bool = False) -> Path:
    """A site directory holding one installed plug-in package, ``halfsoft_plugin``, that declares a router."""
    site = root / "site"
    package = site / "halfsoft_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            """A third-party router: soft routing at half the temperature of its options."""
            from dataclasses import dataclass

            from molex.routers import register_router
            from molex.routers.soft import SoftConfig, SoftRouter


            @dataclass
            class HalfSoftConfig(SoftConfig):
                pass


            @register_router
            class HalfSoftRouter(SoftRouter):
                name = "halfsoft"
                config_class = HalfSoftConfig
            '''
        )
    )
    dist = site / "halfsoft_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: halfsoft-plugin\nVersion: 0.1\n")
    entry_points = "[molex.routers]\nhalfsoft = halfsoft_plugin\n"
    if broken:
        entry_points += "broken = no_such_module_anywhere\n"
    (dist / "entry_points.txt").write_text(entry_points)
    return site


def _env_with(site: Path) -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(root)]), "HF_HUB_OFFLINE": "1"}


def test_an_installed_plugin_router_reaches_the_api(tmp_path):
    site = _plugin_site(tmp_path)
    code = textwrap.dedent(
        """
        import json, molex
        router = molex.build_router("halfsoft", in_features=4, num_experts=3)
        config = molex.MoLEConfig(target_modules=["q_proj"], router="halfsoft")
        print(json.dumps({"routers": molex.available_routers(), "built": type(router).__name__,
                          "config": config.router_name}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env_with(site), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "halfsoft" in result["routers"] and result["built"] == "HalfSoftRouter" and result["config"] == "halfsoft"


def test_molex_train_trains_with_a_plugin_router(tmp_path):
    site = _plugin_site(tmp_path)
    run_dir = tmp_path / "run"
    args = [
        "router=halfsoft",
        "experiment=smoke",
        "trainer.max_steps=2",
        "eval.before=false",
        "eval.after=false",
        "analysis.enabled=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "molex.cli.train", *args],
        env=_env_with(site),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert "halfsoft" in json.dumps(config)
