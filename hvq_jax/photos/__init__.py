"""Small photos from the corpus's training split that the demo trains on (SOURCES.md)."""
