"""The plugin's components pass cdmbench's conformance kit, as a third-party plugin's must."""

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("cdmbench_diffusers")

from cdmbench.testing import check_component, components  # noqa: E402

ARGS = {  # beyond the defaults: a small U-Net, and a scheduler for the generic sampler
    "diffusers-unet2d": {"channels": 32, "channel_mult": [1, 2], "attention_resolutions": [8],
                         "num_head_channels": 32},
    "diffusers-scheduler": {"scheduler": "DPMSolverSinglestepScheduler"},
}


@pytest.mark.parametrize("component", components("diffusers", alone=True), ids=lambda c: f"{c.kind}:{c.name}")
def test_component_conforms(component):
    check_component(component, ARGS.get(component.name, {}))


def test_a_recipe_may_list_the_installed_plugin_module_too():
    """Listing the module under a recipe's `plugins:` (as a run from the source tree does) while
    its entry point is installed loads it once."""
    from cdmbench.plugins import load_plugins

    plugins = load_plugins(["cdmbench_diffusers.plugin"])
    assert plugins["samplers"].get("diffusers-euler").plugin == "diffusers"
