"""Canary routing: which alias answers a request.

With an ``X-Device-Id`` the choice is sticky: the device's hash picks a bucket in
0–9,999 and buckets below ``share × 100`` go to the canary, so a device keeps its route
while the share stays put, and raising the share only moves devices from production to
the canary (never back). Without a device id the route is drawn at random.
"""

from __future__ import annotations

import hashlib
import random

from serving.contracts import Route

__all__ = ["BUCKETS", "choose_route", "device_bucket"]

BUCKETS = 10_000


def device_bucket(device_id: str) -> int:
    """The device's bucket in ``[0, BUCKETS)`` (SHA-256: stable across processes)."""
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def choose_route(device_id: str | None, share: float, has_canary: bool,
                 rng: random.Random | None = None) -> Route:
    """``production`` or ``canary`` for one request.

    Args:
        device_id: the client's device id, or None.
        share: canary share in percent, [0, 100].
        has_canary: whether a canary model is loaded (else always production).
        rng: randomness for requests without a device id.

    Raises:
        ValueError: ``share`` outside [0, 100].
    """
    if not 0.0 <= share <= 100.0:
        raise ValueError(f"canary share must lie in [0, 100], got {share}")
    if not has_canary or share <= 0.0:
        return "production"
    if device_id:
        return "canary" if device_bucket(device_id) < share * BUCKETS / 100 else "production"
    return "canary" if (rng or random).random() * 100 < share else "production"
