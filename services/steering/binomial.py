"""A share of binary outcomes with its 95% interval (Wilson score), for win rates."""

import math

Z95 = 1.959964


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of `successes` in `n` trials; (0, 1) when n is 0. Unlike
    the normal approximation it stays inside [0, 1] and is usable at small n and near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
