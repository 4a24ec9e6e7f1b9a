"""The control plane: the HTTP JSON API (accounts, posts, moderation; spaces and admission in
their own issues). Routes are thin: they parse, authorise and call ``townhall.social``."""
