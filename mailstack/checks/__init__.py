"""The built-in message checks, one module each; ``mailstack.plugins`` makes them available."""
