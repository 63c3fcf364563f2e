"""Built-in chain-of-lora strategies (import name ``cola_plugins``).

Each module is an ordinary pluggy plugin, registered through this distribution's ``cola``
entry points exactly as a third-party plugin is.
"""
