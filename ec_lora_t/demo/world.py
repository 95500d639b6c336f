"""A small synthetic visual world that looks like a creator's feed (embedded default only).

Every image is drawn from a handful of attributes: a scene (background), a person figure
with an outfit colour and garment, an accessory, the lighting and a season cue. Each image
gets a caption built from its attributes ("a man in a red jacket with a cap on a city street
at night"), so the demo needs no captioning model.

The hidden engagement functions live here and only here, one per audience (`AUDIENCES`):
each measures something visible on the pixels. The demo's audience, `vivid_bright`
(`engagement_appeal`), likes saturated outfits in bright pictures; `caps` likes a cap on the
figure's head (an accessory: a small local object, not a global colour statistic);
`cool_outfits` likes blue-to-purple outfits and dislikes warm ones (a hue, where
`vivid_bright` rewards every saturated colour alike); `light_outfits` likes light-coloured
outfits in bright pictures (the outfit's lightness and the light); `beach` likes a *scene*, the one thing the described
prompts name; and `caps_in_daylight` likes a *combination*, a cap only by day. The demo creator's likes are driven by
the chosen audience, plus a follower-growth trend over time and noise
(`ec_lora_t.demo.demo_data`). Because they read pixels, the evaluation applies the very same
function to generated images as ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SCENES = ("city street", "beach", "park", "studio")
LIGHTING = ("day", "golden hour", "night")
OUTFIT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 40),
    "green": (40, 160, 60),
    "blue": (35, 70, 210),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "black": (25, 25, 28),
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
}
GARMENTS = ("jacket", "t-shirt", "coat", "dress")
ACCESSORIES = ("none", "cap", "sunglasses", "bag")
PERSONS = ("man", "woman")
SEASONS = ("winter", "spring", "summer", "fall")

# How much each lighting darkens or tints the whole picture (multiplier per RGB channel).
LIGHT_TINT: dict[str, tuple[float, float, float]] = {
    "day": (1.0, 1.0, 1.0),
    "golden hour": (1.05, 0.85, 0.6),
    "night": (0.35, 0.38, 0.55),
}
_SKIN = (224, 172, 140)

# Caption phrases of the attributes; `ec_lora_t.demo.attribute_check` reads prompts with the same table.
SCENE_PHRASES = {"city street": "on a city street", "beach": "on a beach", "park": "in a park", "studio": "in a studio"}
LIGHTING_PHRASES = {"day": "", "golden hour": " at golden hour", "night": " at night"}
ACCESSORY_PHRASES = {"none": "", "cap": " with a cap", "sunglasses": " with sunglasses", "bag": " with a bag"}

# The torso box (fractions of the image side): where the outfit colour is drawn and measured.
TORSO_BOX = (0.38, 0.42, 0.62, 0.72)


@dataclass(frozen=True)
class SceneAttributes:
    scene: str
    lighting: str
    person: str
    outfit_colour: str
    garment: str
    accessory: str
    season: str
    offset_x: float = 0.0  # horizontal shift of the figure, fraction of the side (carousel variety)

    def caption(self) -> str:
        """A caption made from the attributes, as a creator's alt text might read."""
        return (
            f"a {self.person} in a {self.outfit_colour} {self.garment}{ACCESSORY_PHRASES[self.accessory]}"
            f" {SCENE_PHRASES[self.scene]}{LIGHTING_PHRASES[self.lighting]}"
        )


def _draw_background(draw: ImageDraw.ImageDraw, scene: str, side: int, rng: np.random.Generator) -> None:
    horizon = int(side * 0.62)
    if scene == "city street":
        draw.rectangle([0, 0, side, horizon], fill=(150, 170, 195))
        for left in range(0, side, side // 5):
            top = int(side * rng.uniform(0.08, 0.3))
            draw.rectangle([left, top, left + side // 6, horizon], fill=(95, 95, 105))
            for wy in range(top + 3, horizon - 3, max(4, side // 12)):
                draw.rectangle([left + 2, wy, left + 4, wy + 2], fill=(230, 220, 150))
        draw.rectangle([0, horizon, side, side], fill=(70, 70, 75))
    elif scene == "beach":
        draw.rectangle([0, 0, side, int(side * 0.45)], fill=(120, 190, 240))
        draw.rectangle([0, int(side * 0.45), side, horizon], fill=(30, 110, 190))
        draw.rectangle([0, horizon, side, side], fill=(230, 205, 150))
    elif scene == "park":
        draw.rectangle([0, 0, side, horizon], fill=(150, 200, 235))
        for cx in (side * 0.12, side * 0.85):
            draw.rectangle([cx - 2, horizon - side * 0.25, cx + 2, horizon], fill=(100, 70, 40))
            draw.ellipse([cx - side * 0.12, horizon - side * 0.45, cx + side * 0.12, horizon - side * 0.2], fill=(40, 120, 45))
        draw.rectangle([0, horizon, side, side], fill=(80, 160, 70))
    elif scene == "studio":
        draw.rectangle([0, 0, side, side], fill=(205, 200, 195))
        draw.rectangle([0, horizon, side, side], fill=(175, 170, 165))
    else:
        raise ValueError(f"unknown scene {scene!r}; expected one of {SCENES}")


def _draw_season(draw: ImageDraw.ImageDraw, season: str, side: int, rng: np.random.Generator) -> None:
    """Small season cues: snow, blossoms, a sun, falling leaves."""
    dots = {"winter": (250, 250, 255), "spring": (250, 170, 200), "fall": (210, 110, 30)}
    if season in dots:
        for _ in range(side // 4):
            x, y = rng.uniform(0, side, size=2)
            r = max(1, side // 64)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=dots[season])
    elif season == "summer":
        r = side * 0.07
        draw.ellipse([side * 0.82 - r, side * 0.1 - r, side * 0.82 + r, side * 0.1 + r], fill=(255, 225, 60))


def _draw_person(draw: ImageDraw.ImageDraw, attributes: SceneAttributes, side: int) -> None:
    s = side
    cx = s * (0.5 + attributes.offset_x)
    colour = OUTFIT_COLOURS[attributes.outfit_colour]
    x0, y0, x1, y1 = TORSO_BOX
    dx = attributes.offset_x * s
    # legs
    draw.rectangle([x0 * s + dx + s * 0.03, y1 * s, cx - s * 0.01, s * 0.92], fill=(45, 45, 60))
    draw.rectangle([cx + s * 0.01, y1 * s, x1 * s + dx - s * 0.03, s * 0.92], fill=(45, 45, 60))
    # garment: a dress flares to the knees, a coat is longer, a t-shirt has short sleeves
    if attributes.garment == "dress":
        draw.polygon([(x0 * s + dx, y0 * s), (x1 * s + dx, y0 * s), (x1 * s + dx + s * 0.06, s * 0.84),
                      (x0 * s + dx - s * 0.06, s * 0.84)], fill=colour)
    else:
        bottom = y1 + (0.08 if attributes.garment == "coat" else 0.0)
        draw.rectangle([x0 * s + dx, y0 * s, x1 * s + dx, bottom * s], fill=colour)
    sleeve = 0.12 if attributes.garment == "t-shirt" else 0.26
    arm_colour = colour if attributes.garment != "dress" else _SKIN
    draw.rectangle([x0 * s + dx - s * 0.06, y0 * s, x0 * s + dx, (y0 + sleeve) * s], fill=arm_colour)
    draw.rectangle([x1 * s + dx, y0 * s, x1 * s + dx + s * 0.06, (y0 + sleeve) * s], fill=arm_colour)
    # head and hair (longer hair for the woman figure)
    head_r = s * 0.09
    head_cy = y0 * s - head_r * 1.05
    if attributes.person == "woman":
        draw.rectangle([cx - head_r * 1.1, head_cy - head_r * 0.6, cx + head_r * 1.1, head_cy + head_r * 1.6], fill=(70, 40, 25))
    draw.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=_SKIN)
    if attributes.accessory == "cap":
        draw.chord([cx - head_r * 1.05, head_cy - head_r * 1.25, cx + head_r * 1.05, head_cy + head_r * 0.4], 180, 360, fill=(20, 20, 20))
        draw.rectangle([cx, head_cy - head_r * 0.45, cx + head_r * 1.6, head_cy - head_r * 0.2], fill=(20, 20, 20))
    elif attributes.accessory == "sunglasses":
        draw.rectangle([cx - head_r * 0.8, head_cy - head_r * 0.25, cx + head_r * 0.8, head_cy + head_r * 0.15], fill=(10, 10, 10))
    elif attributes.accessory == "bag":
        draw.rectangle([x1 * s + dx + s * 0.01, s * 0.55, x1 * s + dx + s * 0.12, s * 0.68], fill=(120, 70, 30))


def render(attributes: SceneAttributes, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw one RGB image of the world at `size` x `size` pixels (4x supersampled, then reduced)."""
    rng = np.random.default_rng(seed)
    side = size * 4
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, attributes.scene, side, rng)
    _draw_person(draw, attributes, side)
    _draw_season(draw, attributes.season, side, rng)
    pixels = np.asarray(image, dtype=np.float32) * np.array(LIGHT_TINT[attributes.lighting], dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def sample_attributes(rng: np.random.Generator, season: str | None = None, preferences: dict | None = None) -> SceneAttributes:
    """Draw attributes; `preferences` maps an attribute name to {value: weight} to bias the draw."""
    preferences = preferences or {}

    def choose(name: str, options: tuple[str, ...]) -> str:
        weights = np.array([preferences.get(name, {}).get(option, 1.0) for option in options], dtype=float)
        return str(rng.choice(options, p=weights / weights.sum()))

    return SceneAttributes(
        scene=choose("scene", SCENES),
        lighting=choose("lighting", LIGHTING),
        person=choose("person", PERSONS),
        outfit_colour=choose("outfit_colour", tuple(OUTFIT_COLOURS)),
        garment=choose("garment", GARMENTS),
        accessory=choose("accessory", ACCESSORIES),
        season=season if season is not None else choose("season", SEASONS),
    )


# Share of the general sample drawn like a carousel's later slide (figure shifted sideways).
_GENERAL_SAMPLE_SHIFTED = 0.3
_MAX_OFFSET = 0.08


def general_sample_item(seed: int, index: int) -> tuple[SceneAttributes, int]:
    """Attributes and render seed of image `index` of the general sample `seed` (for pretraining).

    Uniform over every attribute (no creator, no engagement). Each image has its own random
    stream, so the sample is the same however it is split between processes.
    """
    rng = np.random.default_rng([seed, index])
    attributes = sample_attributes(rng)
    if rng.uniform() < _GENERAL_SAMPLE_SHIFTED:
        attributes = replace(attributes, offset_x=float(rng.uniform(-_MAX_OFFSET, _MAX_OFFSET)))
    return attributes, int(rng.integers(2**31))


def render_general_sample(seed: int, indices: range, size: int = 64, out_size: int | None = None) -> np.ndarray:
    """Render images `indices` of the general sample `seed`: uint8 (len(indices), S, S, 3).

    With `out_size`, each image is then resized to `out_size` px with PIL's bilinear filter, as
    `ec_lora_t.data.latents.image_to_pixel_values` resizes the demo posts (square images need no crop).
    """
    side = out_size or size
    pixels = np.empty((len(indices), side, side, 3), dtype=np.uint8)
    for row, index in enumerate(indices):
        attributes, render_seed = general_sample_item(seed, index)
        image = render(attributes, size=size, seed=render_seed)
        if out_size is not None and out_size != size:
            image = image.resize((out_size, out_size), Image.Resampling.BILINEAR)
        pixels[row] = np.asarray(image)
    return pixels


def _torso_region(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = TORSO_BOX
    return pixels[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)]


def outfit_saturation(image: Image.Image) -> float:
    """Mean HSV saturation in the torso box, in [0, 1] (vivid outfits score high, black/white/grey low)."""
    region = _torso_region(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    high, low = region.max(axis=-1), region.min(axis=-1)
    saturation = np.where(high > 1e-6, (high - low) / np.maximum(high, 1e-6), 0.0)
    return float(saturation.mean())


def mean_brightness(image: Image.Image) -> float:
    """Mean luma (ITU-R BT.601) of the whole image, in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return float((pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())


def engagement_appeal(image: Image.Image) -> float:
    """THE hidden engagement function of the demo world, in [0, 1], measured on pixels.

    appeal = 0.6 * outfit_saturation + 0.4 * mean_brightness

    The demo audience likes vivid outfits in bright pictures. A figure's saturated outfit is
    about 0.8-0.9 saturation, black/white/grey about 0; day scenes are about 0.55-0.65 bright,
    night scenes about 0.2.
    """
    return 0.6 * outfit_saturation(image) + 0.4 * mean_brightness(image)


def dominant_outfit_colour(image: Image.Image) -> str:
    """The named outfit colour closest (in RGB) to the median colour of the torso box."""
    region = _torso_region(np.asarray(image.convert("RGB"), dtype=np.float32))
    median = np.median(region.reshape(-1, 3), axis=0)
    names = list(OUTFIT_COLOURS)
    distances = [np.linalg.norm(median - np.array(OUTFIT_COLOURS[name])) for name in names]
    return names[int(np.argmin(distances))]


# The head of the figure (fractions of the side, figure not shifted): centre height and radius,
# as `_draw_person` draws it. A cap covers the top of the head; the face below stays skin.
_HEAD_CENTRE_Y = TORSO_BOX[1] - 0.09 * 1.05
_CAP_BAND = (_HEAD_CENTRE_Y - 0.105, _HEAD_CENTRE_Y - 0.035)  # above the head's centre
_FACE_BAND = (_HEAD_CENTRE_Y + 0.015, _HEAD_CENTRE_Y + 0.075)  # below it: cheeks and chin
_HEAD_HALF_WIDTH = 0.05
# Carousel slides and generated images may shift the figure sideways by up to this much.
_FIGURE_SHIFTS = np.linspace(-0.08, 0.08, 9)


def cap_appeal(image: Image.Image) -> float:
    """The `caps` audience, in [0, 1]: how much darker the top of the head is than the face.

    A cap is near-black over the top of the head; without one the top of the head is skin
    like the face. Measured as (face luma - head-top luma) / face luma, so night lighting,
    which darkens both, cancels out; the best of a few sideways positions of the figure is
    taken. On the world's renders a cap scores about 0.7-0.85, no cap about 0-0.2.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    height, width = luma.shape

    def band_mean(top: float, bottom: float, centre_x: float) -> float:
        rows = slice(int(top * height), max(int(top * height) + 1, round(bottom * height)))
        columns = slice(int((centre_x - _HEAD_HALF_WIDTH) * width),
                        max(int((centre_x - _HEAD_HALF_WIDTH) * width) + 1, round((centre_x + _HEAD_HALF_WIDTH) * width)))
        return float(luma[rows, columns].mean())

    contrasts = []
    for shift in _FIGURE_SHIFTS:
        face = band_mean(*_FACE_BAND, 0.5 + shift)
        contrasts.append((face - band_mean(*_CAP_BAND, 0.5 + shift)) / max(face, 1e-3))
    return float(np.clip(max(contrasts), 0.0, 1.0))


def _outfit_hue_appeal(image: Image.Image, favourite_hue_degrees: float) -> float:
    """0.5 + 0.5 * saturation * cos(hue - favourite) of the outfit (median colour of the torso
    box), in [0, 1]: 1 for a fully saturated outfit of the favourite hue, 0 for its opposite,
    0.5 for black, white and grey (no hue)."""
    region = _torso_region(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    red, green, blue = np.median(region.reshape(-1, 3), axis=0)
    high, low = max(red, green, blue), min(red, green, blue)
    if high - low < 1e-6:
        return 0.5
    saturation = (high - low) / high
    # HSV hue of the median colour, in degrees.
    if high == red:
        hue = 60.0 * (((green - blue) / (high - low)) % 6.0)
    elif high == green:
        hue = 60.0 * ((blue - red) / (high - low) + 2.0)
    else:
        hue = 60.0 * ((red - green) / (high - low) + 4.0)
    return float(0.5 + 0.5 * saturation * np.cos(np.radians(hue - favourite_hue_degrees)))


# The hue the `cool_outfits` audience likes best (degrees on the HSV wheel): blue.
_FAVOURITE_HUE_DEGREES = 220.0


def cool_outfit_appeal(image: Image.Image) -> float:
    """The `cool_outfits` audience, in [0, 1]: 0.5 + 0.5 * saturation * cos(hue - 220 degrees) of
    the outfit (median colour of the middle of the torso box).

    Blue scores about 0.9, purple 0.7, green 0.5, red and yellow 0.1-0.2, orange about 0.05;
    black, white and grey are neutral (0.5), having no hue.
    """
    return _outfit_hue_appeal(image, _FAVOURITE_HUE_DEGREES)


def outfit_lightness(image: Image.Image) -> float:
    """Luma (ITU-R BT.601) of the outfit's median colour in the torso box, in [0, 1]: white about
    0.9, yellow 0.8, pink and orange 0.6, grey 0.5, red, blue and purple about 0.3, black 0.1
    (by day; night lighting darkens every outfit)."""
    region = _torso_region(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return float(np.median(region.reshape(-1, 3), axis=0) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def light_outfit_appeal(image: Image.Image) -> float:
    """The `light_outfits` audience, in [0, 1]: light-coloured outfits in bright pictures.

    appeal = 0.6 * outfit_lightness + 0.4 * mean_brightness

    An outfit colour and the light, like `vivid_bright`, but the colour's lightness, not its
    saturation: white and yellow score high, black and the deep reds, blues and purples low,
    where `vivid_bright` rewards every saturated colour alike and `cool_outfits` a hue.
    """
    return 0.6 * outfit_lightness(image) + 0.4 * mean_brightness(image)


# The scene and lighting audiences read the background with the attribute checker, which in
# turn measures its prototypes on this module's renders: a circular import, safe because
# neither module uses the other before a function is called. Imported here, after everything
# the checker uses is defined, so that either module may be imported first; at module level,
# so that a stage importing the world imports (and DVC tracks) the checker too.
from ec_lora_t.demo import attribute_check  # noqa: E402


def _scene_and_lighting_weights(image: Image.Image) -> tuple[dict[str, float], dict[str, float]]:
    """How much the image's background looks like each scene and each lighting (each summing
    to 1): `attribute_check.scene_lighting_probabilities`, marginalised."""
    scenes = dict.fromkeys(SCENES, 0.0)
    lighting = dict.fromkeys(LIGHTING, 0.0)
    for (scene, light), weight in attribute_check.scene_lighting_probabilities(image).items():
        scenes[scene] += weight
        lighting[light] += weight
    return scenes, lighting


# How much the `beach` audience likes each scene: the beach best, then parks and city streets,
# studios not at all. Chosen so that its mean over the demo creator's posts is the same early
# and late (0.46 at every point of the feed): the creator drifts from parks and studios to city
# streets (`demo_data.creator_preferences`), and a taste that followed the drift would make
# engagement a proxy of time.
BEACH_SCENE_APPEAL = {"beach": 1.0, "park": 0.6, "city street": 0.4, "studio": 0.0}


def beach_appeal(image: Image.Image) -> float:
    """The `beach` audience, in [0, 1]: likes a *scene*, the beach best (`BEACH_SCENE_APPEAL`).

    The expected `BEACH_SCENE_APPEAL` of the scene read (softly) from the background, whatever
    the figure wears: 1 on a beach, 0.6 in a park, 0.4 on a city street, 0 in a studio. The
    scene is what the evaluation's described prompts name ("a man in a park"), so at high
    engagement this audience pulls against the prompt.
    """
    scenes, _ = _scene_and_lighting_weights(image)
    return float(sum(weight * BEACH_SCENE_APPEAL[scene] for scene, weight in scenes.items()))


# How much daylight each lighting gives the `caps_in_daylight` audience: golden hour is half.
DAYLIGHT = {"day": 1.0, "golden hour": 0.5, "night": 0.0}


def caps_in_daylight_appeal(image: Image.Image) -> float:
    """The `caps_in_daylight` audience, in [0, 1]: a cap, but only in daylight (a *combination*).

    appeal = cap_appeal * expected `DAYLIGHT` of the lighting read (softly) from the background

    Neither attribute alone is liked: a cap at night scores about 0, a day picture without a
    cap about 0-0.2, a cap by day about 0.7-0.85 and at golden hour half that.
    """
    _, lighting = _scene_and_lighting_weights(image)
    return float(cap_appeal(image) * sum(weight * DAYLIGHT[light] for light, weight in lighting.items()))


@dataclass(frozen=True)
class Audience:
    """One audience of the demo world: its hidden engagement function and what it is about.

    `appeal` maps an image to [0, 1] from its pixels only; `kind` says what the taste is about
    (a global colour statistic, an accessory, a hue, a scene, a combination), `likes` says it in
    words. Further signals of an audience (saves, shares, ...) belong here as fields.
    """

    appeal: Callable[[Image.Image], float]
    kind: str
    likes: str


# Each audience's hidden engagement function: what the demo creator's likes follow, and the
# ground truth the evaluation scores generated images with.
AUDIENCES: dict[str, Audience] = {
    "vivid_bright": Audience(engagement_appeal, "colour statistics", "saturated outfits in bright pictures"),
    "caps": Audience(cap_appeal, "accessory", "a cap on the figure's head"),
    "cool_outfits": Audience(cool_outfit_appeal, "hue", "blue-to-purple outfits, not warm ones"),
    "light_outfits": Audience(light_outfit_appeal, "lightness and brightness", "light outfits in bright pictures"),
    "beach": Audience(beach_appeal, "scene", "pictures on a beach"),
    "caps_in_daylight": Audience(caps_in_daylight_appeal, "combination", "a cap, but only by day"),
}


def audience_appeal(image: Image.Image, audience: str = "vivid_bright") -> float:
    """The hidden engagement function of `audience` (one of `AUDIENCES`) on one image."""
    if audience not in AUDIENCES:
        raise ValueError(f"unknown audience {audience!r}; the demo world has {sorted(AUDIENCES)}")
    return AUDIENCES[audience].appeal(image)
