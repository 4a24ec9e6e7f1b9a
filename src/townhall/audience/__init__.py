"""The audience plane: the program mix as LL-HLS for listeners (packager, playlists, origin)."""
