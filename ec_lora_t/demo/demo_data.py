"""The demo creator: a deterministic synthetic feed written in the report's layout.

`<root>/<shortcode>/img_XX.jpg` plus one `metadata.csv` per post with
`shortcode, likes_count, comments_count, timestamp` (Unix seconds) and the post's own
`caption` (alt text), as in report section 3.2.2.

How engagement is generated (the only place; the visual part is the audience's function in
`world.AUDIENCES`, by default `vivid_bright` = `world.engagement_appeal`):

    followers(t) = 8000 * (1 + 1.5 * t)                t = days since the first post / span
    likes        = followers(t) * 0.05 * (0.2 + 1.6 * appeal) * LogNormal(0, noise)
    comments     = likes * 0.03 * LogNormal(0, 0.3)

where `appeal` is the mean appeal of the post's images to the audience. Beside likes and
comments the feed has a business account's insights (`insights.csv`, `DEMO_INSIGHTS`: saves,
shares and reach per post, keyed by permalink, as Instagram's export writes them), each count
driven by its own audience (`DEMO_SIGNAL_RATES`; saves by default follow `caps`, shares `beach`):

    saves        = followers(t) * 0.008 * (0.2 + 1.6 * appeal[saves audience])  * LogNormal(0, noise)
    shares       = followers(t) * 0.003 * (0.2 + 1.6 * appeal[shares audience]) * LogNormal(0, noise)
    reach        = followers(t) * 0.45 * LogNormal(0, 0.1)      (the follower trend, no picture)

so the signal an engagement is computed from (`features.signals`) decides what the model
learns, and the evaluation scores it with that signal's function
(`ec_lora_t.demo.ground_truth.signal_audience_weights`). So engagement depends
on what is visible (for the default audience: vivid outfits, bright pictures), on a
follower-growth trend in time, and on noise. The creator has a personal style (caps and
jackets) that drifts over time, from parks and studios to city streets and from coats to
jackets; the drift is in scene and garment, not in the appeal itself, so a model of time
alone explains only the follower trend. `time_drift_score` reads that drift back from pixels:
the ground truth of the time sweep.

The feed's root holds `demo_world.json` (`DEMO_MANIFEST`): that the posts come from this world
and which audience liked them, so that the evaluation knows when its ground truth applies.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ec_lora_t.data.seasons import season_of
from ec_lora_t.demo import world

FIRST_POST = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
SPAN_DAYS = 600
_SHORTCODE_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def creator_preferences(time_fraction: float) -> dict[str, dict[str, float]]:
    """The demo creator's personal style at a point of the feed (0 = first post, 1 = last)."""
    return {
        "accessory": {"cap": 4.0, "sunglasses": 1.5, "bag": 1.0, "none": 1.0},
        "garment": {"jacket": 3.0 + 3.0 * time_fraction, "t-shirt": 2.0, "coat": 3.0 * (1 - time_fraction) + 0.5, "dress": 0.5},
        "scene": {"park": 4.0 * (1 - time_fraction) + 0.5, "studio": 2.0 * (1 - time_fraction) + 0.5,
                  "city street": 0.5 + 5.0 * time_fraction, "beach": 1.0},
        "lighting": {"day": 2.0, "golden hour": 1.0, "night": 1.0},
        "person": {"man": 1.0, "woman": 0.0},
    }


DEMO_MANIFEST = "demo_world.json"
DEMO_WORLD_ID = "ec-lora-t demo world"
# The feed's insights export (saves, shares, reach), beside the posts: `ingest.insights` reads it.
DEMO_INSIGHTS = "insights.csv"
# Each counted signal's expected count per follower at appeal a is rate * (0.2 + 1.6 a), a the
# mean appeal of the post's images to the signal's audience. Comments follow the likers: 3 % of
# the likes times E[LogNormal(0, 0.3)] = exp(0.045).
DEMO_SIGNAL_RATES = {"likes": 0.05, "comments": 0.05 * 0.03 * float(np.exp(0.045)), "saves": 0.008, "shares": 0.003}
# Accounts reached per follower: the follower trend and noise, nothing the picture shows.
DEMO_REACH_RATE = 0.45


def _lateness(attribute: str, values_of_class: dict[str, tuple[str, ...]], grid: int = 1001) -> dict[str, float]:
    """E[t | the image shows a class of `attribute`], t uniform on [0, 1], under the creator's drift.

    `values_of_class` groups the attribute's values into what can be read from pixels (e.g.
    long garments: coat and dress). p(class | t) = summed preference weights / all weights.
    """
    times = np.linspace(0.0, 1.0, grid)
    weights = [creator_preferences(float(time))[attribute] for time in times]
    lateness = {}
    for name, values in values_of_class.items():
        share = np.array([sum(w[v] for v in values) / sum(w.values()) for w in weights])
        lateness[name] = float((times * share).sum() / share.sum())
    return lateness


def time_drift_score(image) -> float:
    """The creator's drift read from pixels, in [0, 1]: how late in the feed an image looks.

    The mean of E[t | scene] and E[t | garment length] under `creator_preferences` (t uniform),
    with the scene and the garment length (coat or dress vs jacket or t-shirt) read by
    `ec_lora_t.demo.attribute_check`, rescaled so that the earliest-looking combination (a
    park or studio, a coat) is 0 and the latest-looking (a city street, a jacket) is 1, the
    units of the time target. The ground truth of the time sweep.
    """
    from ec_lora_t.demo.attribute_check import read_attributes, read_garment_length

    scene_lateness, length_lateness, earliest, latest = _drift_scale()
    score = scene_lateness[read_attributes(image)["scene"]] + length_lateness[read_garment_length(image)]
    return (score - earliest) / (latest - earliest)


@functools.cache
def _drift_scale() -> tuple[dict[str, float], dict[str, float], float, float]:
    """The lateness tables of `time_drift_score` and their lowest and highest sums: fixed by the
    world, built once (2 x 1001 preference draws) rather than per scored image."""
    scene_lateness = _lateness("scene", {scene: (scene,) for scene in world.SCENES})
    length_lateness = _lateness("garment", {"long": ("coat", "dress"), "short": ("jacket", "t-shirt")})
    earliest = min(scene_lateness.values()) + min(length_lateness.values())
    latest = max(scene_lateness.values()) + max(length_lateness.values())
    return scene_lateness, length_lateness, earliest, latest


def read_demo_manifest(posts_dir: str | Path) -> dict | None:
    """The demo world's manifest of a posts folder, or None when the posts are not the demo feed."""
    path = Path(posts_dir) / DEMO_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("world") != DEMO_WORLD_ID or manifest.get("audience") not in world.AUDIENCES:
        raise ValueError(f"{path}: not a manifest of the demo world ({manifest})")
    return manifest


def signal_audiences(audience: str, saves_audience: str, shares_audience: str) -> dict[str, str]:
    """Whose taste each counted signal of the demo feed follows (comments follow the likers)."""
    audiences = {"likes": audience, "comments": audience, "saves": saves_audience, "shares": shares_audience}
    unknown = sorted({name for name in audiences.values() if name not in world.AUDIENCES})
    if unknown:
        raise ValueError(f"unknown audience(s) {unknown}; the demo world has {sorted(world.AUDIENCES)}")
    return audiences


def _insights_row(shortcode: str, timestamp: float, followers: float, saves_appeal: float, shares_appeal: float,
                  rng: np.random.Generator, noise: float) -> dict[str, object]:
    """One post's row of the demo's insights export, with the headers Instagram's export uses."""
    def count(rate: float, appeal: float) -> int:
        return int(round(followers * rate * (0.2 + 1.6 * appeal) * rng.lognormal(0.0, noise)))

    return {
        "Permalink": f"https://www.instagram.com/p/{shortcode}/",
        "Publish time": datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%m/%d/%Y %H:%M"),
        "Reach": int(round(followers * DEMO_REACH_RATE * rng.lognormal(0.0, 0.1))),
        "Saves": count(DEMO_SIGNAL_RATES["saves"], saves_appeal),
        "Shares": count(DEMO_SIGNAL_RATES["shares"], shares_appeal),
    }


def write_demo_posts(root: str | Path, num_posts: int = 200, image_size: int = 64, seed: int = 7,
                     noise: float = 0.15, audience: str = "vivid_bright", saves_audience: str = "caps",
                     shares_audience: str = "beach") -> dict[str, float]:
    """Write the demo feed under `root`: posts whose likes follow `audience`, and the insights
    export whose saves follow `saves_audience` and shares `shares_audience`; return summary figures."""
    audiences = signal_audiences(audience, saves_audience, shares_audience)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    days = np.sort(rng.uniform(0, SPAN_DAYS, size=num_posts))
    days[0] = 0.0
    num_images = 0
    insights = []
    for post_index, day in enumerate(days):
        time_fraction = day / SPAN_DAYS
        timestamp = FIRST_POST.timestamp() + day * 86400.0
        season = season_of(datetime.fromtimestamp(timestamp, tz=timezone.utc))  # drives the drawn season cue
        attributes = world.sample_attributes(rng, season=season, preferences=creator_preferences(time_fraction))
        slides = int(rng.choice([1, 2, 3], p=[0.75, 0.15, 0.10]))  # carousels of 2-3 images
        shortcode = "".join(rng.choice(_SHORTCODE_ALPHABET, size=11))
        post_dir = root / shortcode
        post_dir.mkdir(exist_ok=True)
        appeals: dict[str, list[float]] = {name: [] for name in dict.fromkeys(audiences.values())}
        for slide in range(slides):
            slide_attributes = replace(attributes, offset_x=float(rng.uniform(-0.08, 0.08)) if slide else 0.0)
            image = world.render(slide_attributes, size=image_size, seed=seed * 100003 + post_index * 7 + slide)
            image.save(post_dir / f"img_{slide:02d}.jpg", quality=95)
            for name, values in appeals.items():
                values.append(world.audience_appeal(image, name))
        num_images += slides
        followers = 8000.0 * (1.0 + 1.5 * time_fraction)
        likes = followers * 0.05 * (0.2 + 1.6 * float(np.mean(appeals[audience]))) * rng.lognormal(0.0, noise)
        comments = likes * 0.03 * rng.lognormal(0.0, 0.3)
        with open(post_dir / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["shortcode", "likes_count", "comments_count", "timestamp", "caption"])
            writer.writerow([shortcode, int(round(likes)), int(round(comments)), int(timestamp), attributes.caption()])
        # The insights draw from their own stream, so the posts and their likes are the same as
        # in a feed written before the demo had insights.
        insights.append(_insights_row(shortcode, timestamp, followers, float(np.mean(appeals[saves_audience])),
                                      float(np.mean(appeals[shares_audience])),
                                      np.random.default_rng([seed, 1, post_index]), noise))
    with open(root / DEMO_INSIGHTS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(insights[0]))
        writer.writeheader()
        writer.writerows(insights)
    manifest = {"world": DEMO_WORLD_ID, "audience": audience, "seed": seed, "num_posts": num_posts,
                "image_size": image_size, "noise": noise, "insights": DEMO_INSIGHTS,
                "signals": {name: {"audience": audiences[name], "rate": rate} for name, rate in DEMO_SIGNAL_RATES.items()},
                "reach_rate": DEMO_REACH_RATE}
    (root / DEMO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"posts": num_posts, "images": num_images}
