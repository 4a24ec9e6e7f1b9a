"""The social layer: accounts, sessions, follows, posts and moderation (database operations
shared by the HTTP API and the command line)."""
