"""Session records: what each session was, how it ended, and where the records live."""
