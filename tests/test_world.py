from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ec_lora_t.demo import world

RED_CAP_NIGHT = world.SceneAttributes(
    scene="city street", lighting="night", person="man", outfit_colour="red", garment="jacket", accessory="cap",
    season="winter",
)


def test_caption_names_the_attributes():
    assert RED_CAP_NIGHT.caption() == "a man in a red jacket with a cap on a city street at night"
    day = replace(RED_CAP_NIGHT, lighting="day", accessory="none", scene="park", person="woman", garment="dress")
    assert day.caption() == "a woman in a red dress in a park"


def test_render_is_deterministic_and_sized():
    first = np.asarray(world.render(RED_CAP_NIGHT, size=32, seed=3))
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, np.asarray(world.render(RED_CAP_NIGHT, size=32, seed=3)))
    # The seed moves the random parts (building heights, snow), not the figure.
    assert not np.array_equal(first, np.asarray(world.render(RED_CAP_NIGHT, size=32, seed=4)))


def test_lighting_darkens_and_outfit_colour_is_in_the_torso_box():
    day = world.render(replace(RED_CAP_NIGHT, lighting="day"), size=64, seed=0)
    night = world.render(RED_CAP_NIGHT, size=64, seed=0)
    assert world.mean_brightness(night) < 0.6 * world.mean_brightness(day)
    assert world.dominant_outfit_colour(day) == "red"
    blue = world.render(replace(RED_CAP_NIGHT, lighting="day", outfit_colour="blue"), size=64, seed=0)
    assert world.dominant_outfit_colour(blue) == "blue"


def test_engagement_appeal_prefers_vivid_outfits_in_bright_pictures():
    vivid_day = world.render(replace(RED_CAP_NIGHT, lighting="day", outfit_colour="yellow"), size=64, seed=0)
    grey_night = world.render(replace(RED_CAP_NIGHT, outfit_colour="grey"), size=64, seed=0)
    assert world.engagement_appeal(vivid_day) > world.engagement_appeal(grey_night) + 0.3


def test_general_sample_does_not_depend_on_how_it_is_split():
    whole = world.render_general_sample(seed=5, indices=range(6), size=32, out_size=16)
    parts = np.concatenate([world.render_general_sample(5, range(0, 2), 32, 16),
                            world.render_general_sample(5, range(2, 6), 32, 16)])
    assert whole.shape == (6, 16, 16, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, parts)
    assert world.general_sample_item(5, 3) == world.general_sample_item(5, 3)
    assert world.general_sample_item(5, 3) != world.general_sample_item(6, 3)


def test_general_sample_covers_every_attribute_value_uniformly():
    items = [world.general_sample_item(0, index)[0] for index in range(1200)]
    for name, values in [("scene", world.SCENES), ("lighting", world.LIGHTING), ("outfit_colour", world.OUTFIT_COLOURS),
                         ("garment", world.GARMENTS), ("accessory", world.ACCESSORIES), ("season", world.SEASONS)]:
        counts = {value: sum(getattr(item, name) == value for item in items) for value in values}
        expected = len(items) / len(values)
        assert all(0.7 * expected < count < 1.3 * expected for count in counts.values()), (name, counts)
    shifted = [item.offset_x for item in items if item.offset_x != 0.0]
    assert 0.2 < len(shifted) / len(items) < 0.4
    assert max(abs(offset) for offset in shifted) <= 0.08


def test_preferences_bias_the_draw():
    rng = np.random.default_rng(0)
    drawn = [world.sample_attributes(rng, preferences={"scene": {"beach": 1.0, "park": 0.0, "studio": 0.0,
                                                                 "city street": 0.0}}) for _ in range(20)]
    assert {item.scene for item in drawn} == {"beach"}


def test_unknown_scene_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scene 'moon'"):
        world.render(replace(RED_CAP_NIGHT, scene="moon"), size=16)


def _render_with(**attributes):
    from dataclasses import replace as with_attributes

    base = world.SceneAttributes("park", "day", "man", "grey", "jacket", "none", "summer")
    return world.render(with_attributes(base, **attributes), size=64, seed=1).resize((32, 32), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("lighting", ["day", "night"])
def test_caps_audience_sees_a_cap_and_nothing_else(lighting):
    cap = world.cap_appeal(_render_with(accessory="cap", lighting=lighting))
    others = [world.cap_appeal(_render_with(accessory=a, lighting=lighting)) for a in ("none", "sunglasses", "bag")]
    assert cap > 0.6 and max(others) < 0.25
    # the figure shifted sideways, as on a carousel's later slide: still seen
    assert world.cap_appeal(_render_with(accessory="cap", lighting=lighting, offset_x=0.07)) > 0.6


def test_cool_outfits_audience_ranks_hues():
    appeal = {colour: world.cool_outfit_appeal(_render_with(outfit_colour=colour)) for colour in world.OUTFIT_COLOURS}
    assert appeal["blue"] > appeal["purple"] > appeal["green"] > appeal["red"] > appeal["orange"]
    assert appeal["grey"] == pytest.approx(0.5, abs=0.05)  # no hue: neutral
    with pytest.raises(ValueError, match="unknown audience"):
        world.audience_appeal(_render_with(), "everyone")


def test_time_drift_reads_the_creators_drift_from_pixels():
    from ec_lora_t.demo.demo_data import time_drift_score

    late = time_drift_score(_render_with(scene="city street", garment="jacket"))
    early = time_drift_score(_render_with(scene="park", garment="coat"))
    assert late == pytest.approx(1.0) and early < 0.1  # the latest- and (nearly) earliest-looking pictures
    assert early < time_drift_score(_render_with(scene="beach", garment="t-shirt")) < late
