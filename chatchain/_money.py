"""Dollar amounts written with the precision they need.

Costs here run from whole dollars down to millionths of a cent, so a fixed number of decimals
either hides them (``$0.0000``) or buries large ones in zeros, and ``:g`` gives ``2e-05``. One
function writes every amount a person reads: the CLI, the budget messages and the service.
"""

from __future__ import annotations

import math

__all__ = ["format_usd"]

# Two significant digits are enough to tell small amounts apart.
_SIGNIFICANT = 2


def format_usd(amount: float) -> str:
    """``amount`` as dollars: cents for whole amounts, and as many decimals as it takes to show
    two significant digits of smaller ones; never scientific notation, never a lost amount.

    Example:
        >>> [format_usd(x) for x in (0, 2, 1.5, 0.5, 12.3456, 0.0265, 0.00002, 5.9e-06)]
        ['$0.00', '$2.00', '$1.50', '$0.50', '$12.35', '$0.0265', '$0.000020', '$0.0000059']
        >>> format_usd(-0.25), format_usd(1234.5), format_usd(0.9999955), format_usd(0.1234567)
        ('-$0.25', '$1,234.50', '$1.00', '$0.12')
    """
    if amount < 0:
        return "-" + format_usd(-amount)
    if amount == 0 or round(amount, 2) == amount or amount >= 1:
        return f"${amount:,.2f}"
    # Two significant digits, or more (up to four decimals) where that writes the amount
    # exactly, so that a cap set as $0.0265 reads back as written.
    decimals = max(2, -math.floor(math.log10(amount)) + _SIGNIFICANT - 1)
    for exact in range(decimals, 5):
        if round(amount, exact) == amount:
            return f"${amount:,.{exact}f}"
    return f"${amount:,.{decimals}f}"
