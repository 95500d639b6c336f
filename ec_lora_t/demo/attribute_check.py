"""Reading the demo world's attributes back from pixels: scene, lighting and outfit colour.

The embedded base model is only useful if what it draws follows the prompt. This checker
says what an image shows, with no model of its own: it knows where the world puts things
(`ec_lora_t.demo.world`) and what they look like.

- scene and lighting, read together: the mean colours of three background bands (sky,
  horizon, ground) at the left and right edges, where the figure never is, are compared with
  prototypes measured on the world's own renders, one per (scene, lighting) pair. The nearest
  prototype wins. Reading the pair together matters because the lighting tints the background:
  a beach at night and a city street by day are both mid-grey on the ground.
- outfit colour: the median colour of the middle of the torso box, compared with each named
  outfit colour under the lighting just read (a red jacket at night is dark maroon).

On the world's renders it is right for (nearly) every image (tests/test_attribute_check.py);
on generated images it measures how often the model drew what the prompt named.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np
from PIL import Image

from ec_lora_t.demo import world

CHECKED_ATTRIBUTES = ("scene", "lighting", "outfit_colour")

# Background bands (top, bottom) as fractions of the height, read in the outer columns only
# (see _EDGE_COLUMNS): the sky, the horizon band (buildings, sea, tree trunks, studio wall) and
# the ground (asphalt, sand, grass, studio floor).
_BACKGROUND_BANDS = ((0.05, 0.30), (0.48, 0.60), (0.72, 0.97))
# Left and right 20% of the width: the figure (torso box 0.38-0.62, dress flare, bag to 0.74,
# carousel offsets up to 0.08) never reaches them.
_EDGE_COLUMNS = ((0.0, 0.2), (0.8, 1.0))
# The middle of the torso box: still inside the garment when the figure is shifted sideways.
_TORSO_CORE = (0.43, 0.47, 0.57, 0.67)
# Size at which the prototypes are measured: demo images are 64 px, the pipeline resizes them to 32.
_PROTOTYPE_RENDER_SIZE = 64
_PROTOTYPE_SIZE = 32


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB pixels in [0, 1], (H, W, 3) float32; accepts a PIL image or a uint8/float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return np.clip(pixels.astype(np.float32), 0.0, 1.0)


def background_features(image: Image.Image | np.ndarray) -> np.ndarray:
    """Mean RGB of each background band over the edge columns, in [0, 1]: (9,) = 3 bands x RGB."""
    pixels = _as_pixels(image)
    height, width = pixels.shape[:2]
    features = []
    for top, bottom in _BACKGROUND_BANDS:
        rows = pixels[int(top * height) : max(int(top * height) + 1, int(bottom * height))]
        edges = [
            rows[:, int(left * width) : max(int(left * width) + 1, int(right * width))] for left, right in _EDGE_COLUMNS
        ]
        features.append(np.concatenate([edge.reshape(-1, 3) for edge in edges]).mean(axis=0))
    return np.concatenate(features)


def torso_colour(image: Image.Image | np.ndarray) -> np.ndarray:
    """Median RGB of the middle of the torso box, in [0, 255]: (3,)."""
    pixels = _as_pixels(image)
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = _TORSO_CORE
    core = pixels[int(y0 * height) : max(int(y0 * height) + 1, int(y1 * height)),
                  int(x0 * width) : max(int(x0 * width) + 1, int(x1 * width))]
    return np.median(core.reshape(-1, 3), axis=0) * 255.0


@lru_cache(maxsize=1)
def scene_lighting_prototypes(
    renders_per_pair: int = 24, seed: int = 0
) -> tuple[tuple[tuple[str, str], ...], np.ndarray]:
    """Mean background features of the world's renders for every (scene, lighting) pair.

    Rendered at 64 px and resized to 32 px as the pipeline does, with all other attributes
    (figure, outfit, accessory, season, sideways offset) drawn at random so that the
    prototype averages over them. Returns the pairs and a (pairs, 9) array.
    """
    rng = np.random.default_rng(seed)
    pairs = tuple((scene, lighting) for scene in world.SCENES for lighting in world.LIGHTING)
    prototypes = np.zeros((len(pairs), 3 * len(_BACKGROUND_BANDS)), dtype=np.float32)
    for index, (scene, lighting) in enumerate(pairs):
        for draw in range(renders_per_pair):
            attributes = replace(
                world.sample_attributes(rng), scene=scene, lighting=lighting, offset_x=float(rng.uniform(-0.08, 0.08))
            )
            image = world.render(attributes, size=_PROTOTYPE_RENDER_SIZE, seed=int(rng.integers(2**31)))
            image = image.resize((_PROTOTYPE_SIZE, _PROTOTYPE_SIZE), Image.Resampling.BILINEAR)
            prototypes[index] += background_features(image) / renders_per_pair
    return pairs, prototypes


def outfit_colour_under(lighting: str) -> dict[str, np.ndarray]:
    """Each named outfit colour as the world draws it under `lighting` (tinted, clipped), in [0, 255]."""
    tint = np.array(world.LIGHT_TINT[lighting], dtype=np.float32)
    return {name: np.clip(np.array(rgb, dtype=np.float32) * tint, 0, 255) for name, rgb in world.OUTFIT_COLOURS.items()}


# Just below the torso box, in its middle: a coat or a dress reaches down here, a jacket or a
# t-shirt ends above it and the legs show.
_BELOW_TORSO = (0.44, 0.74, 0.56, 0.80)
_LEGS_COLOUR = np.array((45, 45, 60), dtype=np.float32)


def read_garment_length(image: Image.Image | np.ndarray) -> str:
    """'long' (coat or dress) or 'short' (jacket or t-shirt): is the band below the torso the
    outfit's colour or the legs' (both under the lighting read from the background)?"""
    pixels = _as_pixels(image)
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = _BELOW_TORSO
    band = pixels[int(y0 * height) : int(y1 * height) + 1, int(x0 * width) : int(x1 * width) + 1]
    below = np.median(band.reshape(-1, 3), axis=0) * 255.0
    tint = np.array(world.LIGHT_TINT[read_attributes(image)["lighting"]], dtype=np.float32)
    outfit, legs = torso_colour(image), _LEGS_COLOUR * tint
    return "long" if np.linalg.norm(below - outfit) < np.linalg.norm(below - legs) else "short"


# Spread of a render's background features around its (scene, lighting) prototype: a world render
# lies 0.04 (median) to 0.19 (worst of 200) from its own prototype, the two closest prototypes
# 0.27 apart. A Gaussian of this width gives a clean render (nearly) all the weight of its own
# pair and shares it out between the near pairs only where an image falls between them.
_BACKGROUND_SPREAD = 0.05


def scene_lighting_probabilities(image: Image.Image | np.ndarray) -> dict[tuple[str, str], float]:
    """A soft reading of the background: {(scene, lighting): weight}, weights summing to 1.

    exp(-d^2 / (2 * spread^2)) of the distance d to each prototype, normalised; the pair
    `read_attributes` picks has the largest weight. Audiences that like a scene or a lighting
    (`world.AUDIENCES`) score with it, so that a generated image between two scenes scores
    between them instead of jumping.
    """
    pairs, prototypes = scene_lighting_prototypes()
    distances = np.linalg.norm(prototypes - background_features(image)[None, :], axis=1)
    logits = -0.5 * (distances / _BACKGROUND_SPREAD) ** 2
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return {pair: float(weight) for pair, weight in zip(pairs, weights)}


def read_attributes(image: Image.Image | np.ndarray) -> dict[str, str]:
    """What the image shows: {'scene': ..., 'lighting': ..., 'outfit_colour': ...}."""
    pairs, prototypes = scene_lighting_prototypes()
    distances = np.linalg.norm(prototypes - background_features(image)[None, :], axis=1)
    scene, lighting = pairs[int(np.argmin(distances))]
    torso = torso_colour(image)
    candidates = outfit_colour_under(lighting)
    outfit_colour = min(candidates, key=lambda name: float(np.linalg.norm(candidates[name] - torso)))
    return {"scene": scene, "lighting": lighting, "outfit_colour": outfit_colour}


def attributes_named_in(prompt: str) -> dict[str, str]:
    """The checked attributes a prompt names, read with the world's caption phrases.

    A caption of `SceneAttributes.caption()` names day lighting by saying nothing, so a prompt
    that names a scene but no lighting, or says 'daylight' / 'during the day', expects day.
    A prompt that names two outfit colours or two scenes names neither (ambiguous).
    """
    text = prompt.lower()
    named: dict[str, str] = {}
    colours = [name for name in world.OUTFIT_COLOURS if re.search(rf"\b{name}\b", text)]
    if len(colours) == 1:
        named["outfit_colour"] = colours[0]
    scenes = [scene for scene in world.SCENES if re.search(rf"\b{scene}\b", text)]
    if len(scenes) == 1:
        named["scene"] = scenes[0]
    if "night" in text:
        named["lighting"] = "night"
    elif "golden hour" in text:
        named["lighting"] = "golden hour"
    elif "daylight" in text or "during the day" in text or "scene" in named:
        named["lighting"] = "day"
    return named


def score_images(images: Sequence[Image.Image | np.ndarray], expected: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """How often images show the attributes expected of them.

    `expected[i]` maps some of CHECKED_ATTRIBUTES to the value image i should show (other keys
    are ignored). Returns, for each attribute named at least once, the fraction of the images
    naming it that match (`<attribute>`), and `<attribute>_count`; `mean` is the mean of those
    fractions and `all` the fraction of images that match every attribute they name.
    """
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expected attribute sets")
    matches: dict[str, list[bool]] = {name: [] for name in CHECKED_ATTRIBUTES}
    all_match = []
    for image, wanted in zip(images, expected):
        read = read_attributes(image)
        named = [name for name in CHECKED_ATTRIBUTES if name in wanted]
        for name in named:
            matches[name].append(read[name] == wanted[name])
        if named:
            all_match.append(all(read[name] == wanted[name] for name in named))
    scores: dict[str, float] = {}
    for name, hits in matches.items():
        if hits:
            scores[name] = float(np.mean(hits))
            scores[f"{name}_count"] = float(len(hits))
    rates = [scores[name] for name in CHECKED_ATTRIBUTES if name in scores]
    scores["mean"] = float(np.mean(rates)) if rates else float("nan")
    scores["all"] = float(np.mean(all_match)) if all_match else float("nan")
    return scores


def score_prompts(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """`score_images` against the attributes each prompt names (`attributes_named_in`)."""
    return score_images(images, [attributes_named_in(prompt) for prompt in prompts])


def style_profile(images: Sequence[Image.Image | np.ndarray]) -> dict[str, dict[str, float]]:
    """How often each scene, lighting and outfit colour appears in a set of images.

    {'scene': {'city street': 0.4, ...}, 'lighting': {...}, 'outfit_colour': {...}}, every
    value of the world listed (0.0 where absent), each attribute's frequencies summing to 1.
    Comparing the profile of a fine-tuned model's images with the base model's shows the
    style shift (e.g. the demo creator's parks and city streets).
    """
    if len(images) == 0:
        raise ValueError("style_profile needs at least one image")
    readings = [read_attributes(image) for image in images]
    values = {"scene": world.SCENES, "lighting": world.LIGHTING, "outfit_colour": tuple(world.OUTFIT_COLOURS)}
    profile = {}
    for name in CHECKED_ATTRIBUTES:
        counts = Counter(reading[name] for reading in readings)
        profile[name] = {value: counts[value] / len(readings) for value in values[name]}
    return profile


def style_distance(profile: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> dict[str, float]:
    """Total variation distance per attribute between two style profiles, and their mean.

    0 = the same frequencies, 1 = no value in common. Used to say whether a fine-tuned model
    draws closer to the creator's posts than the base model does.
    """
    distances = {
        name: 0.5 * sum(abs(profile[name].get(value, 0.0) - reference[name].get(value, 0.0))
                        for value in sorted(set(profile[name]) | set(reference[name])))
        for name in CHECKED_ATTRIBUTES
    }
    return {**distances, "mean": sum(distances.values()) / len(distances)}
