"""The pipeline is declared once (tasks/steps/pipeline.py): every profile's steps come from the one registry, in an
order where each step's inputs come before it, and the flows build exactly those steps."""
from __future__ import annotations

import pytest

from tasks.feature_models import FeatureModels
from tasks.steps import pipeline
from tasks.steps.pipeline import GENERAL, STEPS, TALKING_HEAD, TALKING_HEAD_FLAME, StepOptions, build_steps
from tasks.steps.shard import ShardStep

PROFILES = [TALKING_HEAD, GENERAL, TALKING_HEAD_FLAME]
MODELS = FeatureModels("lp", "hubert", "vae")  # paths only: building a step loads nothing


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p.name}-{p.feature_steps[0]}")
def test_every_step_of_every_profile_is_the_registry_class_of_its_name(profile):
    assert [STEPS[name] for name in profile.steps] == list(profile.step_classes)
    assert profile.steps[0] == "download" and profile.steps[-1] == ShardStep.name
    assert profile.crop_step in ("crop", "center_crop")


def test_the_registry_names_each_class_once_by_its_class_constant():
    assert all(cls.name == name for name, cls in STEPS.items())
    assert len({cls.name for cls in STEPS.values()}) == len(STEPS) == 9
    # versions are class constants: the step store keys on them without building a step
    assert all(isinstance(cls.version, str) and cls.version for cls in STEPS.values())


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p.name}-{p.feature_steps[0]}")
def test_built_steps_follow_the_profile_and_read_only_what_came_before(profile, tmp_path):
    steps = build_steps(profile, profile.steps, StepOptions(tmp_path, models=MODELS, flame_dir="flame"))
    assert [s.name for s in steps] == list(profile.clip_steps)
    assert all(type(s) is STEPS[s.name] for s in steps)
    seen: set[str] = set()
    for step in steps:
        assert set(step.requires) <= seen, (step.name, step.requires, seen)
        seen.add(step.name)
    shard = ShardStep(requires=(profile.crop_step, *profile.feature_steps))
    assert set(shard.requires) <= seen


def test_without_models_only_the_steps_that_load_none_are_built(tmp_path):
    steps = build_steps(TALKING_HEAD, TALKING_HEAD.steps, StepOptions(tmp_path))
    assert [s.name for s in steps] == ["download", "crop"]
    assert pipeline.weights_needed(TALKING_HEAD) == ["liveportrait_root", "hubert", "wan_vae"]
    assert pipeline.weights_needed(GENERAL) == ["wan_vae"]


def test_the_flows_and_plan_read_the_registry(tmp_path):
    from flows.layout import DatasetLayout
    from flows.plan import CPU_STEPS, GPU_STEPS, PIPELINE_STEPS
    from flows.preprocess import clip_steps_for
    from flows.preprocess_options import ModelWeights, QualityChecks, WindowOptions

    layout = DatasetLayout(str(tmp_path), "t")
    steps = clip_steps_for(GENERAL, GENERAL.steps, layout, MODELS, WindowOptions(), ModelWeights(), QualityChecks())
    assert [type(s) for s in steps] == list(GENERAL.step_classes[:-1])
    assert steps[-1].requires == ("center_crop",)  # the VAE encodes the profile's own crop
    assert PIPELINE_STEPS == TALKING_HEAD.steps
    assert set(CPU_STEPS) | set(GPU_STEPS) == set(PIPELINE_STEPS) and not set(CPU_STEPS) & set(GPU_STEPS)
    assert GPU_STEPS == ("motion", "audio_features", "vae_latents")


def test_an_unknown_step_names_the_profile_choices():
    with pytest.raises(ValueError, match="unknown steps \\['motion'\\] for the general profile"):
        pipeline.wanted_steps(GENERAL, ["download", "motion"])
