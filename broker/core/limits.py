"""Per-connection limits (pure: the clock is passed in)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``rate <= 0`` means unlimited."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, n: int, now: float) -> int:
        """Take ``n`` tokens: 0 when granted, else how many ms until they would be (nothing is taken)."""
        if self.rate <= 0:
            return 0
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0
        return max(1, int((n - self.tokens) / self.rate * 1000) + 1)
