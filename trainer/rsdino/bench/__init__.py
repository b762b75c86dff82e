"""``rsdino bench``: measurements of the trainer itself (step time, throughput, MFU)."""
