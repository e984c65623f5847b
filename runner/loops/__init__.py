"""One small unit per worker loop (River-style services): each has one job."""
