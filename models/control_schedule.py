"""Control strength over the sampling steps and over the latents (video frames, batch items).

Pure Python/torch; the glue gives it sigmas and the model's percent -> sigma mapping. The rules
are the ones ComfyUI users know from Advanced-ControlNet's timestep and latent keyframes
(docs/schedules.md):

- A step schedule is a list of keyframes sorted by ``start_percent``. Each keyframe starts when
  the sampling sigma falls to ``percent_to_sigma(start_percent)``; the latest started keyframe
  is active. Without a keyframe at 0 the schedule starts with strength 1.
- ``guarantee_steps``: a keyframe stays active for at least that many steps, even when later
  keyframes have started meanwhile (they are then passed over, except one with guaranteed
  steps of its own). A keyframe that starts before the sampling range (a partial denoise)
  guarantees nothing.
- ``interpolation = "linear"``: from its start to the next keyframe's start, the strength
  moves linearly (in sampling percent) to the next keyframe's strength.
- Latent strengths give each latent (frame) its own multiplier: a list of one value per latent
  (or one for all), or keyframes at batch indices (negative counts from the end) with
  ``missing`` for latents not listed (0 in Advanced-ControlNet's keyframes: unlisted latents
  get no control). A keyframe may carry its own latent strengths, used while it is active.

Every multiplier composes by product with the method's own scale.
"""
import math
from dataclasses import dataclass, field

import torch

HOLD, LINEAR = "hold", "linear"
INTERPOLATIONS = (HOLD, LINEAR)


class ScheduleError(ValueError):
    """A schedule or strength list that cannot apply (the message says what to change)."""


@dataclass(frozen=True)
class LatentStrengths:
    """Strength per latent: ``values`` {batch index: strength} (negative: from the end) and the
    strength of latents not listed; or ``per_latent``, one value for each latent (or one for all)."""
    values: dict = field(default_factory=dict)
    missing: float = 1.0
    per_latent: tuple = ()

    @staticmethod
    def from_list(values):
        values = tuple(float(v) for v in values)
        if not values:
            raise ScheduleError("the strength list is empty: give one value, or one per latent")
        if not all(math.isfinite(v) for v in values):
            raise ScheduleError(f"the strength list holds a value that is not a finite number: {values}")
        return LatentStrengths(per_latent=values)

    def check(self, n_latents, node):
        if self.per_latent and len(self.per_latent) not in (1, n_latents):
            raise ScheduleError(f"{node}: the latent strength list has {len(self.per_latent)} values but the latent batch "
                                f"has {n_latents}: give 1 value (for every latent) or exactly {n_latents} in the Latent "
                                "Strengths node connected to its latent_strengths input")

    def for_latents(self, latent_indices, n_latents):
        """float32 tensor of the strength of each latent index in ``latent_indices``."""
        if self.per_latent:
            if len(self.per_latent) == 1:
                return torch.full((len(latent_indices),), self.per_latent[0], dtype=torch.float32)
            return torch.tensor([self.per_latent[int(i)] for i in latent_indices], dtype=torch.float32)
        by_index = {}
        for index, strength in self.values.items():
            real = index + n_latents if index < 0 else index
            if 0 <= real < n_latents:
                by_index[real] = float(strength)
        return torch.tensor([by_index.get(int(i), self.missing) for i in latent_indices], dtype=torch.float32)


@dataclass(frozen=True)
class StepKeyframe:
    start_percent: float
    strength: float = 1.0
    guarantee_steps: int = 1
    interpolation: str = HOLD
    latents: LatentStrengths = None  # while this keyframe is active (None: the ones before it)


class StepSchedule:
    """Keyframes over sampling progress; :meth:`cursor` follows one sampling run."""

    def __init__(self, keyframes, node="XCtrl"):
        keyframes = list(keyframes)
        for k in keyframes:
            if not 0.0 <= k.start_percent <= 1.0:
                raise ScheduleError(f"{node}: a keyframe starts at {k.start_percent}, outside 0..1 (the share of sampling done)")
            if k.interpolation not in INTERPOLATIONS:
                raise ScheduleError(f"{node}: interpolation must be one of {INTERPOLATIONS}, not {k.interpolation!r}")
            if k.guarantee_steps < 0:
                raise ScheduleError(f"{node}: guarantee_steps must be 0 or more, not {k.guarantee_steps}")
            if not math.isfinite(k.strength):
                raise ScheduleError(f"{node}: a keyframe's strength is {k.strength}: give a finite number")
        starts = [k.start_percent for k in keyframes]
        if starts != sorted(starts):
            raise ScheduleError(f"{node}: keyframes must be in order of start_percent, got {starts}")
        if not keyframes or keyframes[0].start_percent > 0.0:
            keyframes.insert(0, StepKeyframe(0.0, 1.0, guarantee_steps=0))
        self.keyframes = tuple(keyframes)

    def cursor(self):
        return StepCursor(self)


def percent_of_sigma(sigma, percent_to_sigma, iterations=40):
    """The sampling percent at which ``percent_to_sigma`` (decreasing) reaches ``sigma``."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class StepCursor:
    """The active keyframe of one sampling run, step by step (keyframe rules in the module doc)."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.reset()

    def reset(self):
        self.index, self.used, self.last_sigma = -1, 0, None

    def at(self, sigma, percent_to_sigma, max_sigma):
        """(strength, latent strengths or None) at this model call's ``sigma`` (float)."""
        keyframes = self.schedule.keyframes
        starts = [percent_to_sigma(k.start_percent) for k in keyframes]
        if self.last_sigma is not None and sigma > self.last_sigma:
            self.reset()  # sigma went up: a new sampling run
        if sigma != self.last_sigma:  # a new step (cond and uncond calls of one step share it)
            self._advance(sigma, starts, max_sigma)
            self.last_sigma = sigma
            self.used += 1
        k = keyframes[self.index]
        strength = k.strength
        if k.interpolation == LINEAR and self.index + 1 < len(keyframes):
            nxt = keyframes[self.index + 1]
            span = nxt.start_percent - k.start_percent
            if span > 0:
                p = min(max(percent_of_sigma(sigma, percent_to_sigma), k.start_percent), nxt.start_percent)
                strength = k.strength + (nxt.strength - k.strength) * (p - k.start_percent) / span
        latents = next((keyframes[i].latents for i in range(self.index, -1, -1) if keyframes[i].latents is not None), None)
        return strength, latents

    def _guaranteed(self, i, starts, max_sigma):
        return 0 if starts[i] > max_sigma else self.schedule.keyframes[i].guarantee_steps

    def _advance(self, sigma, starts, max_sigma):
        if self.index >= 0 and self.used < self._guaranteed(self.index, starts, max_sigma):
            return
        for i in range(self.index + 1, len(starts)):
            if starts[i] < sigma and not math.isclose(starts[i], sigma):
                break  # not started yet
            self.index, self.used = i, 0
            if self._guaranteed(i, starts, max_sigma) > 0:
                break


@dataclass(frozen=True)
class Strengths:
    """Everything that scales one applied control besides its own strength: a step schedule, latent
    strengths, and the multiplier of uncond (negative) rows."""
    schedule: StepSchedule = None
    latents: LatentStrengths = None
    uncond_multiplier: float = 1.0


def parse_strength_list(text, node="XCtrl"):
    """"1.0, 0.8, 0.5" (commas, spaces or new lines) -> [1.0, 0.8, 0.5]."""
    parts = [p for p in text.replace("\n", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ScheduleError(f"{node}: the strengths must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise ScheduleError(f"{node}: give at least one strength (one for every latent, or one per latent)")
    bad = [p.strip() for p, v in zip(parts, values) if not math.isfinite(v)]
    if bad:
        raise ScheduleError(f"{node}: the strengths must be finite numbers, got {', '.join(bad)}")
    return values
