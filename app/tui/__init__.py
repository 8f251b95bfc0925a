"""The chat TUI (Textual): app, screens, widgets, chat store and settings."""
