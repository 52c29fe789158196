"""maskpot data layer: readers, corpus generation, Ray sharding into WebDataset tars, streaming graphs."""
