from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ec_lora_t.demo import attribute_check, world


def _renders(count: int, seed: int, size: int = 64, out_size: int | None = 32):
    """World renders with known attributes, resized as the pipeline resizes the demo posts."""
    rng = np.random.default_rng(seed)
    attributes, images = [], []
    for index in range(count):
        item = replace(world.sample_attributes(rng), offset_x=float(rng.uniform(-0.08, 0.08)))
        image = world.render(item, size=size, seed=seed * 1000 + index)
        if out_size:
            image = image.resize((out_size, out_size), Image.Resampling.BILINEAR)
        attributes.append(item)
        images.append(image)
    return attributes, images


def _expected(items):
    return [{name: getattr(item, name) for name in attribute_check.CHECKED_ATTRIBUTES} for item in items]


@pytest.mark.parametrize("size, out_size", [(64, 32), (64, None)])
def test_checker_reads_the_world_renders(size, out_size):
    items, images = _renders(150, seed=11, size=size, out_size=out_size)
    scores = attribute_check.score_images(images, _expected(items))
    assert scores["scene"] >= 0.98 and scores["lighting"] >= 0.98 and scores["outfit_colour"] >= 0.98
    assert scores["scene_count"] == 150


def test_checker_is_at_chance_against_shuffled_attributes():
    items, images = _renders(150, seed=12)
    shuffled = [_expected(items)[i] for i in np.random.default_rng(0).permutation(len(items))]
    scores = attribute_check.score_images(images, shuffled)
    assert scores["outfit_colour"] < 0.3 and scores["scene"] < 0.5 and scores["all"] < 0.1


def test_outfit_colour_is_read_under_night_lighting():
    night = world.SceneAttributes("beach", "night", "man", "red", "jacket", "none", "summer")
    for colour in world.OUTFIT_COLOURS:
        image = world.render(replace(night, outfit_colour=colour), size=64, seed=1)
        assert attribute_check.read_attributes(image)["outfit_colour"] == colour


def test_reads_uint8_and_float_arrays_like_images():
    items, images = _renders(3, seed=13)
    for image in images:
        as_uint8 = np.asarray(image)
        assert attribute_check.read_attributes(as_uint8) == attribute_check.read_attributes(image)
        assert attribute_check.read_attributes(as_uint8 / 255.0) == attribute_check.read_attributes(image)
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        attribute_check.read_attributes(np.zeros((32, 32)))


def test_attributes_named_in_prompts():
    named = attribute_check.attributes_named_in
    assert named("a man in a red jacket with a cap on a city street at night") == {
        "outfit_colour": "red", "scene": "city street", "lighting": "night"}
    # A caption names day lighting by naming no lighting.
    assert named("a woman in a blue dress on a beach (summer)") == {
        "outfit_colour": "blue", "scene": "beach", "lighting": "day"}
    assert named("a person in daylight") == {"lighting": "day"}
    assert named("(democreator style) a person in an outfit at golden hour") == {"lighting": "golden hour"}
    # Two colours: ambiguous, so not scored.
    assert named("a man in a red and white jacket") == {}


def test_score_images_only_counts_named_attributes():
    items, images = _renders(4, seed=14)
    expected = [{"scene": items[0].scene}, {}, {"outfit_colour": items[2].outfit_colour}, {"scene": "nowhere"}]
    scores = attribute_check.score_images(images, expected)
    assert scores["scene"] == 0.5 and scores["scene_count"] == 2
    assert scores["outfit_colour"] == 1.0 and "lighting" not in scores
    assert scores["all"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="4 images but 3"):
        attribute_check.score_images(images, expected[:3])


def test_style_profile_reflects_a_creator_style():
    rng = np.random.default_rng(15)
    parks = [world.render(replace(world.sample_attributes(rng), scene="park", lighting="day"), size=64, seed=i)
             for i in range(12)]
    profile = attribute_check.style_profile(parks)
    assert set(profile) == {"scene", "lighting", "outfit_colour"}
    assert set(profile["scene"]) == set(world.SCENES)
    assert profile["scene"]["park"] == 1.0 and profile["lighting"]["day"] == 1.0
    assert sum(profile["outfit_colour"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one image"):
        attribute_check.style_profile([])


def test_style_distance_is_zero_for_the_same_profile_and_one_for_disjoint_ones():
    from ec_lora_t.demo.attribute_check import style_distance

    park = {"scene": {"park": 1.0, "beach": 0.0}, "lighting": {"day": 1.0}, "outfit_colour": {"red": 1.0}}
    beach = {"scene": {"park": 0.0, "beach": 1.0}, "lighting": {"day": 1.0}, "outfit_colour": {"red": 0.5, "blue": 0.5}}
    assert style_distance(park, park)["mean"] == 0.0
    distance = style_distance(beach, park)
    assert distance["scene"] == 1.0 and distance["lighting"] == 0.0 and distance["outfit_colour"] == 0.5
    assert distance["mean"] == pytest.approx(0.5)


def test_garment_length_is_read_from_the_renders():
    items, images = _renders(200, seed=13)
    expected = ["long" if item.garment in ("coat", "dress") else "short" for item in items]
    read = [attribute_check.read_garment_length(image) for image in images]
    assert np.mean([a == b for a, b in zip(read, expected)]) >= 0.95


def test_soft_scene_lighting_reading_agrees_with_the_hard_one_on_renders():
    items, images = _renders(60, seed=14)
    for item, image in zip(items, images):
        weights = attribute_check.scene_lighting_probabilities(image)
        assert sum(weights.values()) == pytest.approx(1.0)
        read = attribute_check.read_attributes(image)
        assert max(weights, key=weights.get) == (read["scene"], read["lighting"])
        assert weights[(item.scene, item.lighting)] > 0.9
    # An image halfway between two backgrounds shares its weight between them.
    park, beach = (world.render(replace(items[0], scene=s, lighting="day"), size=64, seed=0) for s in ("park", "beach"))
    halfway = Image.blend(park, beach, 0.5).resize((32, 32), Image.Resampling.BILINEAR)
    weights = attribute_check.scene_lighting_probabilities(halfway)
    assert weights[("park", "day")] > 0.01 and weights[("beach", "day")] > 0.01
    assert weights[("park", "day")] + weights[("beach", "day")] > 0.99
