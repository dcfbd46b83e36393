"""Terminal UIs (Textual). Imported lazily by the CLI: textual is heavy."""
