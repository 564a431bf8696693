"""The toolkit's library: one module per concern, called by the thin scripts at the repository root."""
