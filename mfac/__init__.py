"""mfac."""
