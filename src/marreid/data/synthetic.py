"""The embedded synthetic multi-camera pedestrian dataset (Market-1501 layout).

Two camera networks are rendered with numpy and Pillow, with no downloads: an
*auxiliary* domain (labeled, for pretraining) and a *target* domain (its
training identities are used without labels by MAR). Identity lives in body
shape, clothing colours and textures, hair and carried items; each camera adds
its own look (colour cast, exposure, blur, noise, resolution, background,
viewpoint), and target cameras are drawn with stronger shifts and partly
outdoor scenes, so a model trained on the auxiliary domain transfers imperfectly.

Every random draw comes from a generator keyed by (seed, what, which): an
image depends only on the seed, its identity number, its camera's parameters
and its index, never on the order of rendering, so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from marreid.errors import ConfigError, DatasetError

GENERATOR_TAG = "marreid.synthetic/1"
PARAMS_FILE = "params.json"
DOMAINS = ("auxiliary", "target")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")

# Drawing at twice the output size and box-filtering down gives anti-aliased edges.
_SUPERSAMPLE = 2
_MAX_PID = 9999  # Market-1501 names carry a 4-digit identity
_MAX_CAMS = 9  # and a 1-digit camera
_MAX_DISTRACTORS = 10_000  # keeps their 6-digit frame numbers (50 per distractor) unique

# Stream tags keep the random draws of different things independent.
_IDENTITY, _CAMERA, _IMAGE, _QUERY, _DISTRACTOR, _FRAMES = range(1, 7)


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; the defaults fit the 15-minute CPU demo.

    Attributes
    ----------
    aux_ids, aux_test_ids : identities in the auxiliary training set and in its
        query / gallery (disjoint).
    aux_cams, target_cams : cameras of each domain (2..9).
    target_train_ids, target_test_ids : identities of the target training set
        and of its query / gallery (disjoint).
    per_cam : images per identity per camera.
    queries_per_id : query images per test identity, one per camera, at most
        ``cams`` (``cams - 1`` when ``per_cam`` is 1, so a gallery match in
        another camera always exists).
    distractors : pid-0000 images added to the target gallery.
    image_size : (height, width) of the written crops.
    seed : base of every random draw.
    aux_shift, target_shift : strength of the per-camera photometric and optical
        changes of each domain (0 = neutral cameras; scenes still differ).
    target_outdoor : share of target cameras filming outdoor scenes (auxiliary
        cameras are all indoor); lower it to narrow the domain gap.
    occlusion : probability that an image is partly hidden by an object.
    pose_jitter : scale of per-image pose, lean, offset and scale variation.
    jpeg_quality : JPEG quality of the written files.
    """

    aux_ids: int = 120
    aux_test_ids: int = 40
    aux_cams: int = 4
    target_train_ids: int = 100
    target_test_ids: int = 60
    target_cams: int = 5
    per_cam: int = 3
    queries_per_id: int = 3
    distractors: int = 100
    image_size: tuple[int, int] = (64, 32)
    seed: int = 0
    aux_shift: float = 0.5
    target_shift: float = 0.6
    target_outdoor: float = 0.6
    occlusion: float = 0.15
    pose_jitter: float = 1.0
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        size = self.image_size
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ConfigError(f"SyntheticConfig.image_size must be (height, width), got {size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        h, w = self.image_size
        if h < 16 or w < 8:
            raise ConfigError(f"SyntheticConfig.image_size must be at least 16x8, got {h}x{w}")
        for name in ("aux_ids", "aux_test_ids", "target_train_ids", "target_test_ids",
                     "per_cam", "queries_per_id"):
            _check_int(name, getattr(self, name), 1)
        for name in ("distractors", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.distractors > _MAX_DISTRACTORS:
            raise ConfigError(f"SyntheticConfig.distractors must be at most {_MAX_DISTRACTORS}")
        for name in ("aux_cams", "target_cams"):
            _check_int(name, getattr(self, name), 2)
            if getattr(self, name) > _MAX_CAMS:
                raise ConfigError(f"SyntheticConfig.{name} must be at most {_MAX_CAMS} "
                                  f"(Market-1501 names have one camera digit)")
        _check_int("jpeg_quality", self.jpeg_quality, 1)
        if self.jpeg_quality > 100:
            raise ConfigError("SyntheticConfig.jpeg_quality must be at most 100")
        for name in ("aux_shift", "target_shift", "pose_jitter"):
            if not 0.0 <= float(getattr(self, name)) <= 3.0:
                raise ConfigError(f"SyntheticConfig.{name} must be in [0, 3], got {getattr(self, name)}")
        for name in ("occlusion", "target_outdoor"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        total = self.aux_ids + self.aux_test_ids + self.target_train_ids + self.target_test_ids
        if total > _MAX_PID:
            raise ConfigError(f"SyntheticConfig: aux_ids + aux_test_ids + target_train_ids + "
                              f"target_test_ids = {total}, but at most {_MAX_PID} fit in 4-digit "
                              f"Market-1501 names")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SyntheticConfig:
        """Build from a mapping (e.g. YAML or ``params.json``), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"SyntheticConfig: unknown key(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping that ``from_dict`` turns back into an equal config."""
        values = asdict(self)
        values["image_size"] = list(self.image_size)
        return values


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"SyntheticConfig.{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------- identities

@dataclass(frozen=True)
class Identity:
    """The fixed appearance of one person; fractions are of the body height."""

    height: float
    width: float
    head: float
    legs: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str  # short | long | cap
    hat: tuple[int, int, int]
    upper: tuple[int, int, int]
    upper_second: tuple[int, int, int]
    pattern: str  # solid | stripes | checks | logo
    long_sleeves: bool
    lower: tuple[int, int, int]
    lower_kind: str  # trousers | shorts | skirt
    shoes: tuple[int, int, int]
    bag: str  # none | shoulder | backpack
    bag_colour: tuple[int, int, int]
    bag_left: bool


# Real crowds wear a lot of dark and neutral clothing; sampling them often makes
# distinct people look alike, as in real re-ID data.
_NEUTRALS = ((22, 22, 25), (48, 48, 54), (92, 92, 98), (150, 150, 152), (222, 222, 216),
             (32, 38, 72), (168, 148, 118), (84, 62, 46))
_SKINS = ((241, 200, 170), (224, 172, 135), (190, 140, 100), (141, 96, 66), (96, 64, 44))
_HAIRS = ((18, 14, 12), (52, 34, 22), (98, 66, 38), (196, 160, 100), (150, 150, 150), (120, 50, 30))


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: float) -> tuple[int, int, int]:
    c = np.asarray(colour, dtype=np.float64) + rng.normal(0.0, amount, 3)
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))  # type: ignore[return-value]


def _clothing_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.45:
        return _jitter(rng, _NEUTRALS[rng.integers(len(_NEUTRALS))], 8.0)
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.4, 0.95), rng.uniform(0.35, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


def _pick(rng: np.random.Generator, options: tuple[str, ...], probs: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=probs))]


def draw_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's body proportions, clothes, hair and carried items."""
    upper = _clothing_colour(rng)
    second = _clothing_colour(rng)
    # A pattern in nearly the colour of the shirt would be invisible.
    while sum(abs(a - b) for a, b in zip(upper, second)) < 120:
        second = _clothing_colour(rng)
    return Identity(
        height=float(rng.uniform(0.80, 0.93)),
        width=float(rng.uniform(0.82, 1.2)),
        head=float(rng.uniform(0.12, 0.15)),
        legs=float(rng.uniform(0.43, 0.5)),
        skin=_jitter(rng, _SKINS[rng.integers(len(_SKINS))], 6.0),
        hair=_jitter(rng, _HAIRS[rng.integers(len(_HAIRS))], 6.0),
        hair_style=_pick(rng, ("short", "long", "cap"), (0.55, 0.3, 0.15)),
        hat=_clothing_colour(rng),
        upper=upper,
        upper_second=second,
        pattern=_pick(rng, ("solid", "stripes", "checks", "logo"), (0.4, 0.2, 0.15, 0.25)),
        long_sleeves=bool(rng.random() < 0.5),
        lower=_clothing_colour(rng),
        lower_kind=_pick(rng, ("trousers", "shorts", "skirt"), (0.65, 0.2, 0.15)),
        shoes=_jitter(rng, _NEUTRALS[rng.integers(len(_NEUTRALS))], 10.0),
        bag=_pick(rng, ("none", "shoulder", "backpack"), (0.5, 0.25, 0.25)),
        bag_colour=_clothing_colour(rng),
        bag_left=bool(rng.random() < 0.5),
    )


# ------------------------------------------------------------------- cameras

@dataclass(frozen=True)
class Camera:
    """The look of one camera: photometry, optics, background and viewpoint."""

    gain: tuple[float, float, float]
    brightness: float
    contrast: float
    gamma: float
    blur: float
    noise: float
    resolution: float
    scene: str  # indoor | outdoor
    view: str  # front | back
    mirror: float  # probability that a person walks right-to-left in this view
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    horizon: float
    texture: str  # tiles | panels | foliage
    clutter: tuple[tuple[int, int, int], ...]


# Auxiliary cameras film indoors (halls, corridors); a share of target cameras
# outdoors (foliage, asphalt, brick), so the scene is part of the domain gap.
_SCENES = {
    "indoor": {
        "walls": ((196, 190, 178), (170, 172, 176), (214, 206, 186), (150, 146, 140)),
        "floors": ((120, 116, 110), (182, 176, 160), (96, 100, 104), (150, 130, 106)),
        "textures": ("tiles", "panels"),
    },
    "outdoor": {
        "walls": ((70, 112, 60), (150, 80, 62), (120, 150, 186), (98, 96, 92)),
        "floors": ((74, 74, 78), (128, 124, 116), (104, 92, 80), (60, 88, 52)),
        "textures": ("foliage", "panels", "tiles"),
    },
}
_BACK_VIEW_SHARE = 0.35

# Orthonormal basis of the colour plane r + g + b = 0: a log-gain along it tints
# without changing overall brightness.
_CHROMA = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.sqrt([[2.0], [6.0]])


def draw_cameras(rng: np.random.Generator, shift: float, count: int, outdoor: float) -> list[Camera]:
    """Draw ``count`` cameras; ``shift`` scales their departure from a neutral camera.

    Colour casts point in evenly spaced hue directions (random start),
    brightness levels are evenly spaced, and walls and floors are dealt from
    the scene palettes, so even two or three cameras look clearly different.
    ``round(outdoor * count)`` cameras film outdoor scenes and
    ``round(0.35 * count)`` see people mostly from the back.
    """
    is_outdoor = rng.permutation(count) < round(outdoor * count)
    is_back = rng.permutation(count) < round(_BACK_VIEW_SHARE * count)
    dealt = {scene: (np.resize(rng.permutation(len(pal["walls"])), count),
                     np.resize(rng.permutation(len(pal["floors"])), count))
             for scene, pal in _SCENES.items()}
    hue0 = rng.uniform(0.0, 2.0 * np.pi)
    levels = rng.permutation(np.linspace(-1.0, 1.0, count))
    cameras = []
    for c in range(count):
        scene = "outdoor" if is_outdoor[c] else "indoor"
        palette = _SCENES[scene]
        wall_order, floor_order = dealt[scene]
        angle = hue0 + 2.0 * np.pi * c / count + rng.normal(0.0, 0.3)
        strength = 0.25 * shift * rng.uniform(0.75, 1.25)
        log_gain = strength * (np.cos(angle) * _CHROMA[0] + np.sin(angle) * _CHROMA[1])
        cameras.append(Camera(
            gain=tuple(float(v) for v in np.exp(log_gain)),  # type: ignore[arg-type]
            brightness=float(0.07 * shift * (levels[c] + rng.normal(0.0, 0.3))),
            contrast=float(np.exp(rng.normal(0.0, 0.2 * shift))),
            gamma=float(np.exp(rng.normal(0.0, 0.2 * shift))),
            blur=float(rng.uniform(0.0, 0.7 * shift)),
            noise=float(rng.uniform(1.0, 1.0 + 6.0 * shift)),
            resolution=float(max(0.4, rng.uniform(1.0 - 0.45 * shift, 1.0))),
            scene=scene,
            view="back" if is_back[c] else "front",
            mirror=float(0.85 if rng.random() < 0.5 else 0.15),
            wall=_jitter(rng, palette["walls"][wall_order[c]], 12.0),
            floor=_jitter(rng, palette["floors"][floor_order[c]], 12.0),
            horizon=float(rng.uniform(0.45, 0.75)),
            texture=str(palette["textures"][rng.integers(len(palette["textures"]))]),
            clutter=tuple(_jitter(rng, _NEUTRALS[rng.integers(len(_NEUTRALS))], 30.0) for _ in range(3)),
        ))
    return cameras


def camera_background(camera: Camera, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ``height x width`` RGB scene for ``camera``; crops are windows into it."""
    y = np.arange(height, dtype=np.float64)[:, None, None] / height
    horizon = camera.horizon
    wall = np.asarray(camera.wall, np.float64) * (0.85 + 0.3 * y / max(horizon, 1e-6))
    floor = np.asarray(camera.floor, np.float64) * (0.9 + 0.2 * (y - horizon))
    img = np.where(y < horizon, wall, floor) * np.ones((1, width, 1))
    xs = np.arange(width)[None, :]
    ys = np.arange(height)[:, None]
    if camera.texture == "tiles":
        step = int(rng.integers(10, 18))
        lines = ((xs % step) == 0) | ((ys % step) == 0)
        img[lines & (ys >= horizon * height)] *= 0.8
    elif camera.texture == "panels":
        step = int(rng.integers(14, 28))
        img[np.broadcast_to(((xs % step) < 3) & (ys < horizon * height), (height, width))] *= 0.75
    else:
        cell = max(4, height // 20)  # leaves about a twentieth of the scene tall
        blobs = rng.normal(0.0, 1.0, (height // cell + 2, width // cell + 2)).astype(np.float32)
        leaf = np.asarray(Image.fromarray(blobs).resize((width, height), Image.BICUBIC))
        img *= (1.0 + 0.15 * leaf)[:, :, None]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for colour in camera.clutter:
        x0 = int(rng.integers(0, width))
        w = int(rng.integers(width // 12 + 2, width // 4 + 3))
        y0 = int(rng.integers(0, int(horizon * height) + 1))
        h = int(rng.integers(height // 6, height // 2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    return np.asarray(canvas)


# ----------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Pose:
    """Per-image variation: limb angles, lean, placement, view and occlusion."""

    arm_swing: float
    stride: float
    lean: float
    dx: float
    dy: float
    scale: float
    back: bool
    mirror: bool
    occluder: str  # none | low | side


def draw_pose(rng: np.random.Generator, camera: Camera, jitter: float, occlusion: float) -> Pose:
    """Draw one image's pose; the camera's viewpoint holds for most but not all images."""
    back = (camera.view == "back") != (rng.random() < 0.15)
    occluder = "none"
    if rng.random() < occlusion:
        occluder = "low" if rng.random() < 0.6 else "side"
    return Pose(
        arm_swing=float(rng.normal(0.0, 0.12 * jitter)),
        stride=float(abs(rng.normal(0.0, 0.06 * jitter))),
        lean=float(rng.normal(0.0, 0.025 * jitter)),
        dx=float(rng.normal(0.0, 0.05 * jitter)),
        dy=float(rng.normal(0.0, 0.02 * jitter)),
        scale=float(np.clip(rng.normal(1.0, 0.05 * jitter), 0.8, 1.1)),
        back=bool(back),
        mirror=bool(rng.random() < camera.mirror),
        occluder=occluder,
    )


def _limb(draw: ImageDraw.ImageDraw, top: tuple[float, float], bottom: tuple[float, float],
          width: float, colour: tuple[int, int, int]) -> None:
    draw.line((top, bottom), fill=colour, width=max(1, int(round(width))))


def _point(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def draw_person(canvas: Image.Image, person: Identity, pose: Pose) -> None:
    """Draw ``person`` in ``pose`` onto ``canvas`` (in place), feet near the bottom."""
    cw, ch = canvas.size
    draw = ImageDraw.Draw(canvas)
    ph = person.height * ch * pose.scale
    feet_y = ch * (0.97 + pose.dy)
    top_y = feet_y - ph
    cx = cw * (0.5 + pose.dx)
    lean = pose.lean * ph  # horizontal shift of the shoulders relative to the hips
    bw = person.width

    head_h = person.head * ph
    shoulder_y = top_y + head_h * 1.1
    hip_y = feet_y - person.legs * ph
    sw, ww = 0.14 * ph * bw, 0.1 * ph * bw
    scx = cx + lean

    # Legs first: the torso and skirt overlap their tops.
    leg_w = 0.075 * ph * bw
    knee_t = 0.5
    for side in (-1, 1):
        hip = (cx + side * 0.45 * ww, hip_y)
        foot = (cx + side * (0.45 * ww + pose.stride * ph), feet_y - 0.02 * ph)
        if person.lower_kind == "trousers":
            _limb(draw, hip, foot, leg_w, person.lower)
        else:
            _limb(draw, hip, foot, leg_w * 0.85, person.skin)
            if person.lower_kind == "shorts":
                _limb(draw, hip, _point(hip, foot, knee_t * 0.8), leg_w * 1.05, person.lower)
        fx, fy = foot
        draw.ellipse((fx - leg_w * 0.8, fy - leg_w * 0.45, fx + leg_w * 0.8, fy + leg_w * 0.45),
                     fill=person.shoes)
    pelvis = [(cx - ww, hip_y - 0.02 * ph), (cx + ww, hip_y - 0.02 * ph),
              (cx + ww * 0.95, hip_y + 0.07 * ph), (cx - ww * 0.95, hip_y + 0.07 * ph)]
    draw.polygon(pelvis, fill=person.lower)
    if person.lower_kind == "skirt":
        knee_y = hip_y + knee_t * person.legs * ph * 0.9
        draw.polygon([(cx - ww, hip_y), (cx + ww, hip_y), (cx + ww * 1.5, knee_y),
                      (cx - ww * 1.5, knee_y)], fill=person.lower)

    torso = [(scx - sw, shoulder_y), (scx + sw, shoulder_y), (cx + ww, hip_y), (cx - ww, hip_y)]
    draw.polygon(torso, fill=person.upper)
    _draw_pattern(canvas, person, pose, torso, shoulder_y, hip_y, scx, sw)
    draw = ImageDraw.Draw(canvas)

    if person.bag == "shoulder":
        side = -1 if person.bag_left != pose.mirror else 1
        strap_top = (scx - side * sw * 0.7, shoulder_y)
        bag_x = cx + side * (ww + 0.04 * ph)
        draw.line((strap_top, (bag_x, hip_y)), fill=person.bag_colour, width=max(1, int(0.02 * ph)))
        draw.rectangle((bag_x - 0.06 * ph, hip_y - 0.05 * ph, bag_x + 0.06 * ph, hip_y + 0.06 * ph),
                       fill=person.bag_colour)
    elif person.bag == "backpack" and not pose.back:
        for side in (-1, 1):
            draw.line(((scx + side * sw * 0.55, shoulder_y), (cx + side * ww * 0.7, hip_y - 0.08 * ph)),
                      fill=person.bag_colour, width=max(1, int(0.025 * ph)))

    arm_w = 0.055 * ph * bw
    arm_len = 0.36 * ph
    for side in (-1, 1):
        shoulder = (scx + side * (sw + arm_w * 0.3), shoulder_y + arm_w * 0.5)
        angle = side * 0.08 + pose.arm_swing * side
        hand = (shoulder[0] + math.sin(angle) * arm_len, shoulder[1] + math.cos(angle) * arm_len)
        sleeve_end = hand if person.long_sleeves else _point(shoulder, hand, 0.4)
        _limb(draw, shoulder, hand, arm_w * 0.85, person.skin)
        _limb(draw, shoulder, sleeve_end, arm_w, person.upper)
        draw.ellipse((hand[0] - arm_w * 0.5, hand[1] - arm_w * 0.5, hand[0] + arm_w * 0.5,
                      hand[1] + arm_w * 0.5), fill=person.skin)

    if person.bag == "backpack" and pose.back:
        mid, half = (scx + cx) / 2.0, 0.4 * (sw + ww)
        draw.rounded_rectangle((mid - half, shoulder_y + 0.02 * ph, mid + half, hip_y - 0.02 * ph),
                               radius=max(1, int(0.03 * ph)), fill=person.bag_colour)

    _draw_head(draw, person, pose, scx, top_y, head_h, shoulder_y)


def _draw_pattern(canvas: Image.Image, person: Identity, pose: Pose, torso: list[tuple[float, float]],
                  shoulder_y: float, hip_y: float, scx: float, sw: float) -> None:
    """Stripes, checks or a chest logo in the second colour, clipped to the torso."""
    if person.pattern == "solid" or (person.pattern == "logo" and pose.back):
        return
    if person.pattern == "logo":
        size = (hip_y - shoulder_y) * 0.18
        y = shoulder_y + (hip_y - shoulder_y) * 0.3
        ImageDraw.Draw(canvas).ellipse((scx - size, y - size, scx + size, y + size), fill=person.upper_second)
        return
    torso_mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(torso_mask).polygon(torso, fill=255)
    lines = Image.new("L", canvas.size, 0)
    ldraw = ImageDraw.Draw(lines)
    step = max(3.0, (hip_y - shoulder_y) / 5.0)
    thick = max(1, int(step * 0.45))
    y = shoulder_y + step * 0.5
    while y < hip_y:
        ldraw.line(((0, y), (canvas.size[0], y)), fill=255, width=thick)
        y += step
    if person.pattern == "checks":
        x = scx - sw + step * 0.5
        while x < scx + sw:
            ldraw.line(((x, 0), (x, canvas.size[1])), fill=255, width=thick)
            x += step
    canvas.paste(person.upper_second, mask=ImageChops.multiply(torso_mask, lines))


def _draw_head(draw: ImageDraw.ImageDraw, person: Identity, pose: Pose, x: float, top: float,
               head_h: float, shoulder_y: float) -> None:
    hw = head_h * 0.42
    box = (x - hw, top, x + hw, top + head_h)
    if person.hair_style == "long" and pose.back:
        draw.rectangle((x - hw * 1.1, top + head_h * 0.3, x + hw * 1.1, shoulder_y + head_h * 0.9),
                       fill=person.hair)
    elif person.hair_style == "long":
        # From the front, long hair shows as two locks either side of the neck.
        for side in (-1, 1):
            inner, outer = x + side * hw * 0.6, x + side * hw * 1.15
            draw.rectangle((min(inner, outer), top + head_h * 0.3, max(inner, outer),
                            shoulder_y + head_h * 0.35), fill=person.hair)
    draw.rectangle((x - hw * 0.45, top + head_h * 0.8, x + hw * 0.45, shoulder_y + 1), fill=person.skin)
    draw.ellipse(box, fill=person.skin)
    if person.hair_style == "cap":
        draw.chord(box, 180, 360, fill=person.hat)
        brim = -1 if pose.mirror else 1
        if not pose.back:
            draw.rectangle((x - hw, top + head_h * 0.42, x + hw + brim * hw * 0.4, top + head_h * 0.52),
                           fill=person.hat)
    elif pose.back:
        # Seen from behind, hair covers the head down to the nape.
        draw.chord(box, 150, 390, fill=person.hair)
    else:
        draw.chord(box, 190, 350, fill=person.hair)


def _draw_occluder(canvas: Image.Image, pose: Pose, camera: Camera, rng: np.random.Generator) -> None:
    cw, ch = canvas.size
    colour = camera.clutter[int(rng.integers(len(camera.clutter)))]
    draw = ImageDraw.Draw(canvas)
    if pose.occluder == "low":
        y0 = ch * rng.uniform(0.65, 0.85)
        draw.rectangle((0, y0, cw, ch), fill=colour)
    elif pose.occluder == "side":
        w = cw * rng.uniform(0.2, 0.35)
        x0 = 0.0 if rng.random() < 0.5 else cw - w
        draw.rectangle((x0, 0, x0 + w, ch), fill=colour)


def apply_camera(image: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Photometric and optical camera model on a uint8 ``H x W x 3`` image.

    ``y = clip(gain * ((x ** gamma - 0.5) * contrast + 0.5 + brightness) + n)`` with
    ``x`` in [0, 1] after resolution loss (down- then up-sampling) and Gaussian
    blur, and ``n ~ N(0, noise / 255)`` per pixel.
    """
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if camera.resolution < 0.999:
        small = (max(4, round(w * camera.resolution)), max(8, round(h * camera.resolution)))
        pil = pil.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    if camera.blur > 0.05:
        pil = pil.filter(ImageFilter.GaussianBlur(camera.blur))
    x = np.asarray(pil, dtype=np.float64) / 255.0
    x = (x ** camera.gamma - 0.5) * camera.contrast + 0.5 + camera.brightness
    x = x * np.asarray(camera.gain)
    x = x + rng.normal(0.0, camera.noise / 255.0, x.shape)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def render(person: Identity, camera: Camera, background: np.ndarray, rng: np.random.Generator,
           size: tuple[int, int], pose_jitter: float, occlusion: float) -> Image.Image:
    """One ``size = (height, width)`` crop of ``person`` seen by ``camera``."""
    h, w = size
    ch, cw = h * _SUPERSAMPLE, w * _SUPERSAMPLE
    pose = draw_pose(rng, camera, pose_jitter, occlusion)
    y0 = int(rng.integers(0, background.shape[0] - ch + 1))
    x0 = int(rng.integers(0, background.shape[1] - cw + 1))
    canvas = Image.fromarray(background[y0:y0 + ch, x0:x0 + cw])
    draw_person(canvas, person, pose)
    if pose.occluder != "none":
        _draw_occluder(canvas, pose, camera, rng)
    if pose.mirror:
        canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
    small = np.asarray(canvas.resize((w, h), Image.BOX))
    return Image.fromarray(apply_camera(small, camera, rng))


# ------------------------------------------------------------------- layout

def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class _Domain:
    name: str
    index: int
    cams: int
    shift: float
    outdoor: float
    train_pids: range
    test_pids: range


def _domains(config: SyntheticConfig) -> list[_Domain]:
    """Identity ranges numbered consecutively from 1 so no two sets share an id."""
    a = config.aux_ids
    b = a + config.aux_test_ids
    c = b + config.target_train_ids
    d = c + config.target_test_ids
    return [
        _Domain("auxiliary", 0, config.aux_cams, config.aux_shift, 0.0,
                range(1, a + 1), range(a + 1, b + 1)),
        _Domain("target", 1, config.target_cams, config.target_shift, config.target_outdoor,
                range(b + 1, c + 1), range(c + 1, d + 1)),
    ]


def _file_name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    return f"{pid:04d}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"


def _frames(seed: int, pid: int, cam: int, count: int) -> tuple[int, list[int]]:
    """Sequence digit and strictly increasing frame numbers of one visit to a camera."""
    rng = _rng(seed, _FRAMES, pid, cam)
    seq = int(rng.integers(1, 7))
    start = int(rng.integers(0, 900_000))
    steps = rng.integers(5, 40, count)
    return seq, [start + int(s) for s in np.cumsum(steps)]


def _query_cams(config: SyntheticConfig, pid: int, cams: int) -> set[int]:
    limit = cams if config.per_cam > 1 else cams - 1
    order = _rng(config.seed, _QUERY, pid).permutation(cams)
    return {int(c) for c in order[:min(config.queries_per_id, limit)]}


class _Writer:
    """Saves images into the split folders, counting images and identities per split."""

    def __init__(self, root: Path, config: SyntheticConfig) -> None:
        self.root = root
        self.config = config
        self.counts: dict[str, dict[str, dict[str, Any]]] = {
            d: {s: {"images": 0, "ids": set()} for s in SPLITS} for d in DOMAINS}

    def save(self, domain: str, split: str, name: str, pid: int, image: Image.Image) -> None:
        image.save(self.root / domain / split / name, format="JPEG", quality=self.config.jpeg_quality)
        entry = self.counts[domain][split]
        entry["images"] += 1
        entry["ids"].add(pid)

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        return {d: {s: {"images": e["images"], "ids": len(e["ids"])} for s, e in splits.items()}
                for d, splits in self.counts.items()}


def _render_domain(writer: _Writer, domain: _Domain, cameras: list[Camera],
                   backgrounds: list[np.ndarray]) -> None:
    config = writer.config
    size = config.image_size

    def visit(pid: int, cam: int) -> list[tuple[str, Image.Image]]:
        person = draw_identity(_rng(config.seed, _IDENTITY, pid))
        seq, frames = _frames(config.seed, pid, cam, config.per_cam)
        out = []
        for k, frame in enumerate(frames):
            rng = _rng(config.seed, _IMAGE, pid, cam, k)
            image = render(person, cameras[cam], backgrounds[cam], rng, size,
                           config.pose_jitter, config.occlusion)
            out.append((_file_name(pid, cam, seq, frame, 1), image))
        return out

    for pid in domain.train_pids:
        for cam in range(domain.cams):
            for name, image in visit(pid, cam):
                writer.save(domain.name, "bounding_box_train", name, pid, image)
    for pid in domain.test_pids:
        query_cams = _query_cams(config, pid, domain.cams)
        for cam in range(domain.cams):
            for k, (name, image) in enumerate(visit(pid, cam)):
                split = "query" if k == 0 and cam in query_cams else "bounding_box_test"
                writer.save(domain.name, split, name, pid, image)


def _render_distractors(writer: _Writer, domain: _Domain, cameras: list[Camera],
                        backgrounds: list[np.ndarray]) -> None:
    """Gallery-only people (pid 0) who match no query."""
    config = writer.config
    for k in range(config.distractors):
        rng = _rng(config.seed, _DISTRACTOR, k)
        person = draw_identity(rng)
        cam = int(rng.integers(domain.cams))
        image = render(person, cameras[cam], backgrounds[cam], rng, config.image_size,
                       config.pose_jitter, config.occlusion)
        frame = 50 * (k + 1) + int(rng.integers(0, 50))
        writer.save(domain.name, "bounding_box_test", _file_name(0, cam, 1, frame, 1), 0, image)


# ------------------------------------------------------------------- output

def _is_generated(path: Path) -> bool:
    try:
        params = json.loads((path / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(params, dict) and params.get("generator") == GENERATOR_TAG


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not _is_generated(out):
            raise DatasetError(f"{out}: folder is not empty and was not made by `marreid synth`; "
                               f"choose an empty or new folder")
        if not overwrite:
            raise DatasetError(f"{out}: already holds a synthetic dataset; "
                               f"pass --overwrite (overwrite=True) to replace it")
        for name in DOMAINS:
            shutil.rmtree(out / name, ignore_errors=True)
    for domain in DOMAINS:
        for split in SPLITS:
            try:
                (out / domain / split).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatasetError(f"{out / domain / split}: cannot create ({exc.strerror})") from exc


def _write_params(out: Path, params: dict[str, Any]) -> None:
    tmp = out / (PARAMS_FILE + ".tmp")
    tmp.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / PARAMS_FILE)


def read_params(out_dir: str | Path) -> dict[str, Any]:
    """The ``params.json`` of a generated dataset, with ``config`` as a ``SyntheticConfig``."""
    path = Path(out_dir) / PARAMS_FILE
    try:
        params = json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(params, dict) or params.get("generator") != GENERATOR_TAG:
        raise DatasetError(f"{path}: not written by marreid's synthetic generator")
    if not isinstance(params.get("config"), dict):
        raise DatasetError(f"{path}: has no 'config' mapping")
    params["config"] = SyntheticConfig.from_dict(params["config"])
    return params


def generate(out_dir: str | Path, config: SyntheticConfig | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Write the auxiliary and target domains in Market-1501 layout under ``out_dir``.

    Returns a summary: ``out_dir``, ``seed`` and, per domain, ``cameras`` and per
    split ``{"images": n, "ids": k}`` (``ids`` counts pid 0 once when distractors
    are present). Raises ``DatasetError`` when ``out_dir`` is a non-empty folder
    not made by the generator, or one made by it while ``overwrite`` is false.
    """
    config = config or SyntheticConfig()
    out = Path(out_dir)
    _prepare(out, overwrite)
    domains = _domains(config)
    params: dict[str, Any] = {"generator": GENERATOR_TAG, "complete": False, "seed": config.seed,
                              "config": config.to_dict(), "domains": {}}
    # Written before any image so an interrupted run is still recognised as ours.
    _write_params(out, params)

    writer = _Writer(out, config)
    h, w = config.image_size
    for domain in domains:
        cameras = draw_cameras(_rng(config.seed, _CAMERA, domain.index), domain.shift, domain.cams,
                               domain.outdoor)
        backgrounds = [camera_background(cam, _rng(config.seed, _CAMERA, domain.index, c, 1),
                                         h * _SUPERSAMPLE + h // 2, w * _SUPERSAMPLE * 3)
                       for c, cam in enumerate(cameras)]
        _render_domain(writer, domain, cameras, backgrounds)
        if domain.name == "target":
            _render_distractors(writer, domain, cameras, backgrounds)
        params["domains"][domain.name] = {
            "cameras": [asdict(cam) for cam in cameras],
            "train_pids": [domain.train_pids.start, domain.train_pids.stop - 1],
            "test_pids": [domain.test_pids.start, domain.test_pids.stop - 1],
        }

    counts = writer.summary()
    params["counts"] = counts
    params["complete"] = True
    _write_params(out, params)
    summary: dict[str, Any] = {"out_dir": str(out), "seed": config.seed}
    for domain in domains:
        summary[domain.name] = {"cameras": domain.cams, **counts[domain.name]}
    return summary


__all__ = [
    "Camera",
    "GENERATOR_TAG",
    "Identity",
    "SyntheticConfig",
    "apply_camera",
    "camera_background",
    "draw_cameras",
    "draw_identity",
    "draw_person",
    "generate",
    "read_params",
    "render",
]
