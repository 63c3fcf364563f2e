"""Shipped ``cola sweep`` recipes (TOML): the paper's experiments at GPU scale and at CPU scale.

``cola sweep --list-recipes`` lists them; ``cola sweep --recipe NAME`` runs one; flags replace
any of its settings or axes.
"""
